"""The losses' TPU programs, compiled on this machine without a TPU: their temporary memory.

JAX compiles for a TPU topology that has no devices behind it (ahead of time, "deviceless")
once ``libtpu`` is installed; ``pip install "jax[tpu]==<the installed jax>"`` brings the one
that matches. Each program here is ``jax.value_and_grad`` of a loss (the mean over tokens),
compiled for a single chip of TPU v5e and v6e, and the sharded losses for a v5e 2x4 mesh
(tokens over 2 chips, the vocabulary over 4), beside what users compile without this library:
the logits then optax's loss (and tokamax's chunked XLA loss where tokamax installs, Python >=
3.12). For each it records the temporary bytes of the TPU compiler's own buffer assignment
(``memory_analysis().temp_size_in_bytes``; arguments and outputs not counted), per chip on
the mesh, and the optimized program's copies of the classifier's or the logits' shape.

Only memory and the program are real this way. Nothing runs, and XLA's cost analysis counts
a loop's body once, so no time is reported.

The fused losses' bound per chip, from the tiles (docs/linear-cross-entropy.md, *Memory
bound*, with the TPU's tile ``T x Vc`` of ``jaxsoftmax/tiles/sizes.py``)::

    4 T Vc * 4 bytes      a few float32 tiles: logits, gradient, their products
    + 2 Vc d * 4 bytes    one chunk of the classifier's gradient in float32, and its product
    + N d * 4 bytes       the hidden states' gradient summed in float32, when the inputs are
                          narrower (in float32 the sum is the output's own buffer)
    + 1 MiB               per-row statistics, loop state

(for the distillation losses, twice the tiles: two models' logits). ``method="auto"`` takes
the recompute method on a TPU whatever the classifier's size (the forward method's float32
``[V, d]`` gradient is for the CPU's speed). A program meets its bound within 1.25x, and
copies neither the classifier nor the logits.

    python experiments/tpu_memory.py            # writes benchmarks/results/tpu-compiled/
    python experiments/tpu_memory.py --quick    # small shapes, writes runs/tpu-memory-quick/
    python experiments/tpu_memory.py --shapes llama-3 --topologies v5e --losses linear_cross_entropy

Each finished program is saved in ``<out>/.partial.json``; run the same command again after an
interruption and it compiles only the rest (``--fresh`` starts over). The result files are
written atomically at the end, with the rows of earlier runs (same JAX and libtpu) that this
run did not compile again, so runs of a few losses or shapes add up to the table.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # the scripts' helpers: flag types
import harness  # the benchmarks' helpers: resuming, writing the results

import jaxsoftmax
from jaxsoftmax.tiles import sizes

try:  # tokamax needs Python >= 3.12
    import tokamax
except ImportError:
    tokamax = None

MiB = 2**20
SHAPES = {  # (N tokens, d, V)
    "gemma-2-2b": (8192, 2304, 256000),
    "llama-3": (16384, 4096, 128256),
    "benchmark": (2048, 512, 32768),  # experiments/benchmark.py's timed shape
}
QUICK_SHAPES = {"small": (512, 256, 8192)}
TOPOLOGIES = ("v5e", "v6e")  # single chips
MESH_TOPOLOGY, MESH_AXES = "v5e:2x4", {"batch": 2, "vocab": 4}
LOSSES = (
    "linear_cross_entropy",
    "linear_distillation_loss",
    "cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "distillation_loss",
    "sharded_linear_cross_entropy",
    "sharded_cross_entropy",
    "sharded_linear_distillation_loss",
    "linear_token_log_probs",
    "sharded_linear_token_log_probs",
)
QUICK_OUT = os.path.join("runs", "tpu-memory-quick")  # never committed
TEMPERATURE = 2.0


def topology_devices(name: str) -> list:
    """The devices of TPU topology ``name`` (``"v5e:1x1"``, ``"v5e:2x4"``): nothing behind them
    but the compiler. libtpu 0.0.42 (JAX 0.10) needs a single chip's host bounds spelled out."""
    from jax.experimental import topologies

    try:
        if name.endswith(":1x1"):
            return topologies.get_topology_desc(
                platform="tpu", topology_name=name, chips_per_host_bounds=(1, 1, 1)
            ).devices
        return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as error:  # no libtpu, or one that does not know this chip
        raise SystemExit(
            f"tpu_memory.py: cannot make TPU topology {name!r} ({type(error).__name__}: "
            f'{error}); expected libtpu: pip install "jax[tpu]=={jax.__version__}"'
        ) from None


def spec(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def mean_loss(fn):
    """``fn``'s per-token losses as their mean in float32, as a training step takes them."""
    return lambda *args: jnp.mean(fn(*args).astype(jnp.float32))


def logits_of(h, w, layout):
    return h @ w.T if layout == "vd" else h @ w


# --- the programs ----------------------------------------------------------------------------
# Each builder returns {competitor: (loss, argnums, arguments)}; the loss returns a scalar.


def linear_programs(shape, dtype, layout, grads, place):
    n, d, v = shape
    w_shape = (v, d) if layout == "vd" else (d, v)
    args = (place((n, d), dtype, "h"), place(w_shape, dtype, "w"), place((n,), jnp.int32, "y"))
    argnums = (0,) if grads == "hidden" else (0, 1)
    fused = lambda h, w, y: jaxsoftmax.linear_cross_entropy(h, w, y, classifier_layout=layout)
    naive = lambda h, w, y: jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(
            logits_of(h, w, layout).astype(jnp.float32), y
        )
    )
    found = {"jaxsoftmax": (fused, argnums, args), "logits + optax": (naive, argnums, args)}
    if tokamax is not None and layout == "dv":
        chunked = lambda h, w, y: tokamax.linear_softmax_cross_entropy_loss(
            h, y, w, reduction="mean", implementation="chunked_xla"
        )
        found["tokamax chunked_xla"] = (chunked, argnums, args)
    return found


def sharded_linear_programs(shape, dtype, layout, grads, place, mesh):
    found = linear_programs(shape, dtype, layout, grads, place)
    fused = lambda h, w, y: jaxsoftmax.sharded_linear_cross_entropy(
        h,
        w,
        y,
        mesh=mesh,
        class_axis_name="vocab",
        batch_axis_name="batch",
        classifier_layout=layout,
    )
    _, argnums, args = found["jaxsoftmax"]
    found["jaxsoftmax"] = (fused, argnums, args)
    found.pop("tokamax chunked_xla", None)  # tokamax has no sharded loss
    return found


def distillation_linear_programs(shape, dtype, layout, grads, place, mesh=None):
    n, d, v = shape
    w_shape = (v, d) if layout == "vd" else (d, v)
    args = (
        place((n, d), dtype, "h"),
        place(w_shape, dtype, "w"),
        place((n, d), dtype, "h"),
        place(w_shape, dtype, "w"),
    )
    argnums = (0,) if grads == "hidden" else (0, 1)
    options = dict(temperature=TEMPERATURE, classifier_layout=layout)
    if mesh is None:
        fused = lambda hs, ws, ht, wt: jaxsoftmax.linear_distillation_loss(
            hs, ws, ht, wt, **options
        )
    else:
        fused = lambda hs, ws, ht, wt: jaxsoftmax.sharded_linear_distillation_loss(
            hs,
            ws,
            ht,
            wt,
            mesh=mesh,
            class_axis_name="vocab",
            batch_axis_name="batch",
            **options,
        )

    def naive(hs, ws, ht, wt):  # T^2 KL(teacher || student) of the tempered softmaxes
        zs = logits_of(hs, ws, layout).astype(jnp.float32) / TEMPERATURE
        zt = jax.lax.stop_gradient(logits_of(ht, wt, layout).astype(jnp.float32)) / TEMPERATURE
        kl = optax.kl_divergence(jax.nn.log_softmax(zs), jax.nn.softmax(zt))
        return TEMPERATURE**2 * jnp.mean(kl)

    return {"jaxsoftmax": (fused, argnums, args), "logits + optax": (naive, argnums, args)}


def token_programs(shape, dtype, layout, grads, place, mesh=None):
    """A policy-gradient step's scoring: ``mean(log p) + 0.01 mean(H)`` of the sampled tokens
    (reinforcement learning), fused against ``log_softmax`` of the logits gathered."""
    n, d, v = shape
    w_shape = (v, d) if layout == "vd" else (d, v)
    args = (place((n, d), dtype, "h"), place(w_shape, dtype, "w"), place((n,), jnp.int32, "y"))
    argnums = (0,) if grads == "hidden" else (0, 1)
    options = dict(classifier_layout=layout, return_entropy=True)
    if mesh is None:
        score = lambda h, w, y: jaxsoftmax.linear_token_log_probs(h, w, y, **options)
    else:
        score = lambda h, w, y: jaxsoftmax.sharded_linear_token_log_probs(
            h, w, y, mesh=mesh, class_axis_name="vocab", batch_axis_name="batch", **options
        )

    def naive_score(h, w, y):
        log_p = jax.nn.log_softmax(logits_of(h, w, layout).astype(jnp.float32))
        picked = jnp.take_along_axis(log_p, y[:, None], -1)[:, 0]
        return picked, -jnp.sum(jnp.exp(log_p) * log_p, -1)

    def objective(scorer):
        def value(h, w, y):
            log_p, entropy = scorer(h, w, y)
            return jnp.mean(log_p) + 0.01 * jnp.mean(entropy)

        return value

    return {
        "jaxsoftmax": (objective(score), argnums, args),
        "logits + jax.nn": (objective(naive_score), argnums, args),
    }


def logits_programs(loss, shape, dtype, place, mesh=None):
    n, _, v = shape
    if loss == "distillation_loss":
        args = (place((n, v), dtype, "z"), place((n, v), dtype, "z"))
        ours = lambda zs, zt: jaxsoftmax.distillation_loss(zs, zt, temperature=TEMPERATURE)

        def theirs(zs, zt):
            zs, zt = zs.astype(jnp.float32) / TEMPERATURE, zt.astype(jnp.float32) / TEMPERATURE
            kl = optax.kl_divergence(jax.nn.log_softmax(zs), jax.nn.softmax(zt))
            return TEMPERATURE**2 * jnp.mean(kl)

        return {"jaxsoftmax": (ours, (0,), args), "optax": (theirs, (0,), args)}
    args = (place((n, v), dtype, "z"), place((n,), jnp.int32, "y"))
    if loss == "cross_entropy":
        ours = lambda z, y: jaxsoftmax.cross_entropy(z, y)
    elif loss == "sharded_cross_entropy":
        ours = lambda z, y: jaxsoftmax.sharded_cross_entropy(
            z, y, mesh=mesh, class_axis_name="vocab", batch_axis_name="batch"
        )
    else:
        ours = mean_loss(jaxsoftmax.softmax_cross_entropy_with_integer_labels)
    theirs = mean_loss(optax.softmax_cross_entropy_with_integer_labels)
    return {"jaxsoftmax": (ours, (0,), args), "optax": (theirs, (0,), args)}


# --- compiling and reading the program -------------------------------------------------------


def compile_program(loss, argnums, args):
    """``value_and_grad(loss, argnums)`` compiled for ``args``' TPU shardings: nothing runs."""
    return jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(*args).compile()


_INSTRUCTION = re.compile(
    r"^\s*(ROOT\s+)?%?([\w.\-]+) = (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w\-]+)\("
)
_MOVES = ("copy", "convert", "transpose")


def large_buffers(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """The optimized program's copies, conversions and transposes (alone or fused, by XLA's
    names for them) whose result has one of ``shapes`` (the classifier's and the logits', per
    chip), as ``"name dtype[shape]"``: a second classifier or logits array beside the first."""
    found = []
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if not match or match[1]:
            continue
        name, dtype, dims, opcode = match[2], match[3], match[4], match[5]
        moves = opcode in _MOVES or (opcode == "fusion" and name.startswith(_MOVES))
        if moves and tuple(int(x) for x in dims.split(",") if x) in shapes:
            found.append(f"{name} {dtype}[{dims}]")
    return found


def local_shape(shape, chips: dict) -> tuple[int, int, int]:
    """``(N, d, V)`` of one chip: tokens over the mesh's "batch" axis, classes over "vocab"."""
    n, d, v = shape
    return n // chips.get("batch", 1), d, -(-v // chips.get("vocab", 1))


def large_shapes(loss, shape, chips: dict) -> set[tuple[int, ...]]:
    """The classifier's shapes (both layouts) and the logits' on one chip, for the fused
    losses."""
    n, d, v = local_shape(shape, chips)
    # A loss of logits returns their gradient, an array of their shape: nothing to look for.
    return {(v, d), (d, v), (n, v)} if "linear" in loss else set()


def fused_bound(loss: str, shape, dtype, grads: str, chips: dict) -> int:
    """The bytes the fused loss's tiles and float32 sums need per chip (the module
    docstring)."""
    n, d, v = local_shape(shape, chips)
    narrow = jnp.dtype(dtype) != jnp.float32
    tokens, classes = sizes.default_chunks(n, v, "tpu")
    models = 2 if "distillation" in loss else 1
    bound = models * 4 * tokens * classes * 4 + MiB
    if grads == "both":
        bound += 2 * classes * d * 4
    if narrow:
        bound += n * d * 4
    return bound


_TOO_LARGE = re.compile(r"memory required for HLO temporaries \(([\d.]+)G\) exceeds")


def measure(program, shapes: set[tuple[int, ...]]) -> dict:
    """The compiled program's memory (MiB) and copies (:func:`large_buffers`). A program whose
    temporaries exceed the chip's memory does not compile; XLA:TPU says how much it needed,
    which is recorded (``fits: False``)."""
    start = time.perf_counter()
    try:
        compiled = compile_program(*program)
    except jax.errors.JaxRuntimeError as error:
        needed = _TOO_LARGE.search(str(error))
        if needed is None:
            raise
        return dict(
            temp_mib=float(needed[1]) * 1024,
            fits=False,
            large_buffers=[],
            compile_seconds=round(time.perf_counter() - start, 1),
        )
    memory = compiled.memory_analysis()
    return dict(
        temp_mib=memory.temp_size_in_bytes / MiB,
        argument_mib=memory.argument_size_in_bytes / MiB,
        output_mib=memory.output_size_in_bytes / MiB,
        fits=True,
        large_buffers=large_buffers(compiled.as_text(), shapes),
        compile_seconds=round(time.perf_counter() - start, 1),
    )


def programs_for(loss, topology, shape, dtype, layout, grads) -> tuple[dict, dict]:
    """``({competitor: (loss, argnums, arguments)}, chips)`` for one program of ``loss`` on a
    single chip of ``topology`` (the sharded losses: on the mesh), ``chips`` the mesh's axes."""
    if loss.startswith("sharded"):
        devices = np.array(topology_devices(MESH_TOPOLOGY)).reshape(tuple(MESH_AXES.values()))
        mesh = Mesh(devices, tuple(MESH_AXES))
        rows_of = {"h": P("batch", None), "y": P("batch"), "z": P("batch", "vocab")}
        rows_of["w"] = P("vocab", None) if layout == "vd" else P(None, "vocab")
        place = lambda s, t, kind: spec(s, t, NamedSharding(mesh, rows_of[kind]))
        chips = MESH_AXES
    else:
        mesh = None
        device = topology_devices(f"{topology}:1x1")[0]
        place = lambda s, t, kind: spec(s, t, jax.sharding.make_single_device_sharding(device))
        chips = {}
    if loss == "linear_cross_entropy":
        return linear_programs(shape, dtype, layout, grads, place), chips
    if loss == "sharded_linear_cross_entropy":
        return sharded_linear_programs(shape, dtype, layout, grads, place, mesh), chips
    if "linear_distillation" in loss:
        return distillation_linear_programs(shape, dtype, layout, grads, place, mesh), chips
    if "token_log_probs" in loss:
        return token_programs(shape, dtype, layout, grads, place, mesh), chips
    return logits_programs(loss, shape, dtype, place, mesh), chips


def case_rows(loss, topology, shape_name, shape, dtype, layout, grads) -> list[dict]:
    """One row per competitor for one program of ``loss``."""
    sharded = loss.startswith("sharded")
    programs, chips = programs_for(loss, topology, shape, dtype, layout, grads)
    n, d, v = shape
    shapes = large_shapes(loss, shape, chips)
    linear = "linear" in loss
    rows = []
    for competitor, program in programs.items():
        row = dict(
            loss=loss,
            topology=MESH_TOPOLOGY if sharded else f"{topology}:1x1",
            shape=shape_name,
            N=n,
            d=d,
            V=v,
            dtype=jnp.dtype(dtype).name,
            layout=layout if linear else None,
            gradients=grads if linear else "logits",
            competitor=competitor,
            **measure(program, shapes),
        )
        if competitor == "jaxsoftmax" and linear:
            bound = fused_bound(loss, shape, dtype, grads, chips)
            row["bound_mib"] = bound / MiB
            row["within_bound"] = row["temp_mib"] * MiB <= 1.25 * bound
        rows.append(row)
        print(
            f"[{row['topology']} {loss} {shape_name} {row['dtype']} {layout if linear else ''} "
            f"{row['gradients']}] {competitor}: {row['temp_mib']:.1f} MiB"
            + (f" (bound {row['bound_mib']:.1f})" if "bound_mib" in row else "")
            + (f", large: {row['large_buffers']}" if row["large_buffers"] else "")
            + ("" if row["fits"] else ", over the chip's memory: not compiled")
            + f", {row['compile_seconds']} s to compile",
            flush=True,
        )
    return rows


def cases(args) -> list:
    shapes = QUICK_SHAPES if args.quick else {k: SHAPES[k] for k in args.shapes}
    found = []
    for loss in args.losses:
        sharded, linear = loss.startswith("sharded"), "linear" in loss
        for topology in ("v5e",) if sharded else args.topologies:
            for shape_name, shape in shapes.items():
                for dtype in args.dtypes:
                    for layout in args.layouts if linear else (None,):
                        for grads in args.gradients if linear else ("logits",):
                            name = f"{topology} {loss} {shape_name} {dtype} {layout} {grads}"
                            run = functools.partial(
                                case_rows,
                                loss,
                                topology,
                                shape_name,
                                shape,
                                jnp.dtype(dtype),
                                layout,
                                grads,
                            )
                            found.append((name, run))
    return found


def memory_cell(row: dict) -> str:
    if row.get("fits", True):
        return f"{row['temp_mib']:,.1f}"
    return f"{row['temp_mib']:,.0f} (over the chip's memory)"


def write_markdown(path, meta, rows) -> None:
    lines = [
        "# The losses' TPU programs: compiled temporary memory",
        "",
        f"Compiled here for TPU topologies without devices (JAX {meta['jax']}, libtpu "
        f"{meta['libtpu']}); nothing ran. `{meta['command']}`. Temporary MiB of "
        "`value_and_grad` of the mean loss (per chip on the mesh); bound: the fused loss's "
        "tiles and float32 sums (experiments/tpu_memory.py); large: the optimized program's "
        "copies, conversions and transposes of the classifier's or the logits' shape.",
        "",
    ]
    keys = lambda r: (r["topology"], r["loss"], r["shape"], r["dtype"], r["layout"], r["gradients"])
    groups = {}
    for row in rows:
        groups.setdefault(keys(row), {})[row["competitor"]] = row
    competitors = list(dict.fromkeys(r["competitor"] for r in rows))
    table = []
    for key, found in groups.items():
        ours = found.get("jaxsoftmax", {})
        cells = [*(str(k) if k is not None else "" for k in key)]
        cells += [memory_cell(found[c]) if c in found else "" for c in competitors]
        cells.append(f"{ours['bound_mib']:,.1f}" if "bound_mib" in ours else "")
        cells.append({True: "yes", False: "**no**"}.get(ours.get("within_bound"), ""))
        cells.append("; ".join(ours.get("large_buffers", [])) or "none")
        table.append(cells)
    columns = ["topology", "loss", "shape", "dtype", "layout", "gradients", *competitors]
    lines += harness.markdown_table(
        [*columns, "bound", "within 1.25x", "copies (jaxsoftmax)"], table
    )
    from jaxsoftmax import training

    training.write_atomically(path, "\n".join(lines) + "\n")


ROW_KEY = ("topology", "loss", "shape", "dtype", "layout", "gradients", "competitor")


def merged_with_earlier(path: str, settings: dict, rows: list[dict]) -> list[dict]:
    """``rows`` after the rows of ``path`` (an earlier run's results.json with the same
    versions) that they do not replace: runs of a few losses or shapes add to the table."""
    try:
        with open(path) as file:
            earlier = json.load(file)
    except (OSError, ValueError):
        return rows
    if any(earlier["meta"].get(k) != v for k, v in settings.items()):
        return rows
    key = lambda row: tuple(row.get(k) for k in ROW_KEY)
    new = {key(row) for row in rows}
    return [row for row in earlier["rows"] if key(row) not in new] + rows


def parse_arguments(argv):
    parser = harness.benchmark_parser(
        __doc__,
        out=f"output folder; None: benchmarks/results/tpu-compiled, or {QUICK_OUT} with --quick",
        repeats=None,  # nothing is timed
    )
    listed = common.comma_separated_choices
    parser.add_argument("--shapes", type=listed(tuple(SHAPES)), default=list(SHAPES))
    parser.add_argument("--topologies", type=listed(TOPOLOGIES), default=list(TOPOLOGIES))
    parser.add_argument("--losses", type=listed(LOSSES), default=list(LOSSES))
    parser.add_argument(
        "--dtypes", type=listed(("float32", "bfloat16")), default=["float32", "bfloat16"]
    )
    parser.add_argument("--layouts", type=listed(("vd", "dv")), default=["vd", "dv"])
    parser.add_argument("--gradients", type=listed(("hidden", "both")), default=["hidden", "both"])
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_arguments(argv)
    out = harness.output_folder(args, QUICK_OUT, "tpu-compiled")
    meta = dict(
        command=harness.command("tpu_memory.py", argv),
        jax=jax.__version__,
        libtpu=importlib.metadata.version("libtpu"),
        jaxsoftmax=jaxsoftmax.__version__,
        optax=optax.__version__,
        tokamax=importlib.metadata.version("tokamax") if tokamax is not None else "not installed",
        python=sys.version.split()[0],
    )
    meta["quick"] = args.quick
    settings = {k: v for k, v in meta.items() if k != "command"}
    rows = harness.run_cases(out, settings, cases(args), fresh=args.fresh)
    rows = merged_with_earlier(os.path.join(out, "results.json"), settings, rows)
    harness.write_results(out, meta, rows, write_markdown)
    print(f"wrote {out}/results.json and results.md", flush=True)
    return rows


if __name__ == "__main__":
    main()
