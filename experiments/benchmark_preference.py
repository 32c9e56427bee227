"""Benchmark: a fused DPO step against the logits paths users write today.

Three ways to get DPO's loss (the sigmoid loss, beta 0.1) and its gradients with respect to the
policy's hidden states and classifier, from the last hidden states of ``B`` responses (chosen
and rejected interleaved: rows ``2i`` and ``2i + 1``, each masked to its response), beside a
frozen reference model's hidden states and classifier:

* ``fused``: ``jaxsoftmax.linear_preference_loss`` with ``reference=(hidden, classifier)``:
  the policy's and the reference's token log-probabilities from their hidden states, never
  building either model's ``[N, V]`` logits, then the loss;
* ``logits + ours``: both models' logits, ``jaxsoftmax.token_log_probs``, then
  ``sequence_log_probs``, ``preference_pairs`` and ``preference_loss``;
* ``logits + optax``: both models' logits, each token's log-probability as minus optax's
  ``softmax_cross_entropy_with_integer_labels``, summed over each response, and DPO's formula
  written out in JAX (what trainers write by hand, as TRL does in PyTorch).

The reference is frozen in all three (``stop_gradient``; only its forward runs). Every
competitor is first checked against the others (value and gradients), then compiled once and
timed in interleaved rounds (``harness.time_rounds``; the median and the quartiles of the
per-round ratios). Memory is the compiled program's temporary bytes (``memory_analysis()``) at
Llama 3's shape, N = 16384 tokens of chosen and rejected responses (16 of 1024), d = 4096,
V = 128256, and at a middle shape (compiled only, never run here), with the largest array of
the fused program (no ``[N, V]`` one). ``--tpu`` adds the same steps compiled for one chip of
TPU v5e at Llama 3's shape (deviceless, through ``experiments/tpu_memory.py``; it needs
libtpu: the TPU environment, with ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``).

    python experiments/benchmark_preference.py   # writes benchmarks/results/<device>/preference/
    python experiments/benchmark_preference.py --quick   # writes runs/benchmark-preference-quick/
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python experiments/benchmark_preference.py --tpu  # with libtpu

An interrupted run, started again with the same flags, resumes after its last finished case
(``--fresh`` starts over); the results are written atomically at the end.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # helper modules of the scripts: the timing, memory and resuming helpers

import jaxsoftmax
from jaxsoftmax import (
    linear_preference_loss,
    preference_loss,
    preference_pairs,
    sequence_log_probs,
    token_log_probs,
    training,
)

BETA = 0.1  # DPO's beta (TRL's default)
LLAMA_SHAPE = (16, 1024, 4096, 128256)  # (B responses, L tokens each, d, V): N = 16384
MID_SHAPE = (8, 512, 2048, 32768)  # N = 4096
TIMED_SHAPE = (4, 512, 512, 32768)  # N = 2048 tokens, the fused losses' benchmark shape
QUICK_SHAPE = (4, 32, 16, 500)
TPU_TOPOLOGY = "v5e"  # one chip, v5e:1x1
QUICK_OUT = os.path.join("runs", "benchmark-preference-quick")  # never committed


def frozen(h, w):
    return jax.lax.stop_gradient(h), jax.lax.stop_gradient(w)


def fused_loss(h, w, ref_h, ref_w, tokens, mask):
    return linear_preference_loss(h, w, tokens, mask=mask, reference=(ref_h, ref_w), beta=BETA)[0]


def ours_loss(h, w, ref_h, ref_w, tokens, mask):
    def sequences(h, w):
        log_p = token_log_probs(h @ w.T, tokens, where=mask)
        return preference_pairs(sequence_log_probs(log_p, mask=mask), "interleaved")

    chosen, rejected = sequences(h, w)
    ref_chosen, ref_rejected = sequences(*frozen(ref_h, ref_w))
    return preference_loss(chosen, rejected, reference_chosen=ref_chosen,
                           reference_rejected=ref_rejected, beta=BETA)[0]  # fmt: skip


def optax_loss(h, w, ref_h, ref_w, tokens, mask):
    """``-mean log sigmoid(beta ((pi_c - r_c) - (pi_r - r_r)))`` of each response's summed
    token log-probabilities, ``log p_y = -CE(z, y)`` from the materialised logits."""

    def summed(h, w):
        log_p = -optax.losses.softmax_cross_entropy_with_integer_labels(
            (h @ w.T).astype(jnp.float32), tokens
        )
        return jnp.sum(jnp.where(mask, log_p, 0.0), axis=-1)

    policy, reference = summed(h, w), summed(*frozen(ref_h, ref_w))
    margin = (policy[0::2] - reference[0::2]) - (policy[1::2] - reference[1::2])
    return -jnp.mean(jax.nn.log_sigmoid(BETA * margin))


LOSSES = {"fused": fused_loss, "logits + ours": ours_loss, "logits + optax": optax_loss}


@functools.cache  # one program per loss and shape: the memory case reuses the timed one's
def dpo_step(loss):
    """``value_and_grad`` of the loss with respect to the policy's hidden states and classifier."""
    return jax.jit(jax.value_and_grad(loss, (0, 1)))


def inputs(b, length, d, v, dtype, seed=0):
    """The policy's hidden states ``[B, L, d]`` and classifier ``[V, d]``, a reference near them
    (the model DPO starts from), each position's next token, and each row's response mask:
    pairs share a prompt (not counted), each response ends at its own length."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, length, d))
    w = rng.normal(size=(v, d)) / d**0.5
    ref_h = h + 0.1 * rng.normal(size=h.shape)
    ref_w = w + 0.1 * rng.normal(size=w.shape) / d**0.5
    tokens = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
    prompts = np.repeat(rng.integers(length // 8, length // 4 + 1, b // 2), 2)
    ends = rng.integers(prompts + 1, length + 1)
    positions = np.arange(length)[None, :]
    mask = jnp.asarray((positions >= prompts[:, None]) & (positions < ends[:, None]))
    arrays = (jnp.asarray(x, dtype) for x in (h, w, ref_h, ref_w))
    return (*arrays, tokens, mask)


def specs(shape, dtype, sharding=None):
    """The steps' arguments as shapes (compiled only)."""
    b, length, d, v = shape
    s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return (s((b, length, d), dtype), s((v, d), dtype), s((b, length, d), dtype),
            s((v, d), dtype), s((b, length), jnp.int32), s((b, length), jnp.bool_))  # fmt: skip


def case_time(shape, dtype, repeats):
    """One timed row: seconds per step of each competitor and the fused one's ratios."""
    args = inputs(*shape, dtype)
    steps = {name: dpo_step(loss) for name, loss in LOSSES.items()}
    results = {name: step(*args) for name, step in steps.items()}
    agreement = harness.agree(results, dtype)
    rounds = harness.time_rounds({n: (lambda s=s: s(*args)) for n, s in steps.items()}, repeats)
    seconds = harness.medians(rounds)
    row = dict(kind="time", shape=list(shape), dtype=jnp.dtype(dtype).name, agree=agreement,
               loss=float(results["fused"][0]), seconds=seconds)  # fmt: skip
    for name in seconds:
        if name != "fused":
            row[f"fused / {name}"] = seconds["fused"] / seconds[name]
            row[f"fused / {name} quartiles"] = harness.ratio_quartiles(rounds, "fused", name)
    print(f"[time] {shape} {row['dtype']}: "
          + ", ".join(f"{n} {s * 1e3:.0f} ms" for n, s in seconds.items()), flush=True)  # fmt: skip
    return row


_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]+)\]")


def largest_array(hlo: str) -> str:
    """The optimized program's largest array in bytes, as ``"f32[128256,4096]"``."""

    def size(found):
        dtype, dims = found
        bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
        return math.prod(int(x) for x in dims.split(",")) * bits, found

    return "{}[{}]".format(*max(map(size, set(_ARRAY.findall(hlo))))[1])


def add_ratios(row):
    """Each logits path's temporary bytes over the fused step's (None where those are 0)."""
    found = row["temp_bytes"]
    for name in found:
        if name != "fused":
            row[f"{name} / fused"] = found[name] / found["fused"] if found["fused"] else None


def case_memory(shape, dtype):
    """Compiled temporary bytes of each competitor's step at ``shape`` (nothing runs), and the
    fused program's largest array."""
    found, largest = {}, None
    for name, loss in LOSSES.items():
        compiled = dpo_step(loss).lower(*specs(shape, dtype)).compile()
        found[name] = int(compiled.memory_analysis().temp_size_in_bytes)
        if name == "fused":
            largest = largest_array(compiled.as_text())
    row = dict(kind="memory", shape=list(shape), dtype=jnp.dtype(dtype).name, temp_bytes=found,
               fused_largest_array=largest)  # fmt: skip
    add_ratios(row)
    print(f"[memory] {shape} {row['dtype']}: "
          + ", ".join(f"{n} {x / 2**20:.1f} MiB" for n, x in found.items())
          + f"; fused's largest array {largest}", flush=True)  # fmt: skip
    return row


def case_tpu_memory(shape, dtype):
    """The same steps compiled for one chip of TPU v5e (deviceless; needs libtpu): temporary
    bytes (a program over the chip's memory: what XLA:TPU says it needed), and the optimized
    programs' copies, conversions and transposes of the classifier's or the logits' shape."""
    import tpu_memory  # experiments/tpu_memory.py: the TPU topology and the measuring

    topology = f"{TPU_TOPOLOGY}:1x1"
    device = tpu_memory.topology_devices(topology)[0]
    args = specs(shape, dtype, jax.sharding.make_single_device_sharding(device))
    b, length, d, v = shape
    large = {(v, d), (d, v), (b * length, v), (b, length, v)}
    measured = {n: tpu_memory.measure((loss, (0, 1), args), large) for n, loss in LOSSES.items()}
    row = dict(kind="tpu memory", topology=topology, shape=list(shape),
               dtype=jnp.dtype(dtype).name,
               temp_bytes={n: int(m["temp_mib"] * 2**20) for n, m in measured.items()},
               fits={n: m["fits"] for n, m in measured.items()},
               large_buffers={n: m["large_buffers"] for n, m in measured.items()})  # fmt: skip
    add_ratios(row)
    print(f"[tpu memory] {topology} {shape} {row['dtype']}: "
          + ", ".join(f"{n} {m['temp_mib']:.1f} MiB" + ("" if m["fits"] else " (does not fit)")
                      for n, m in measured.items()), flush=True)  # fmt: skip
    return row


def memory_table(rows, names, tpu):
    table = []
    for r in rows:
        cells = [str(tuple(r["shape"])), r["dtype"]]
        for n in names:
            cell = f"{r['temp_bytes'][n] / 2**20:,.1f}"
            cells.append(cell if r.get("fits", {}).get(n, True) else f"{cell} (over the chip)")
        ratios = (r[f"{n} / fused"] for n in names[1:])
        cells += ["" if x is None else f"{x:,.0f}x" if x >= 10 else f"{x:.1f}x" for x in ratios]
        if tpu:
            cells.append("; ".join(r["large_buffers"]["fused"]) or "none")
        else:
            cells.append(f"`{r['fused_largest_array']}`")
        table.append(cells)
    last = "copies of [V, d] or [N, V] (fused)" if tpu else "largest array (fused)"
    columns = ["shape", "dtype", *names, *(f"{n} / fused" for n in names[1:]), last]
    return harness.markdown_table(columns, table)


def write_markdown(path, meta, rows):
    names = list(LOSSES)
    llama_sum = math.prod(LLAMA_SHAPE[:3]) * 4  # bytes
    lines = [
        "# A fused DPO step: time and memory against the logits paths",
        "",
        f"Device: {meta['device']}; JAX {meta['jax']}, Python {meta['python']}; command: "
        f"`{meta['command']}`. DPO's sigmoid loss (beta {BETA}) of chosen and rejected "
        "responses interleaved in one batch, each row masked to its response; gradients of the "
        "policy's hidden states and classifier, the reference model frozen (its hidden states "
        "and classifier given, forward only). Shapes are (B responses, L tokens, d, V); the "
        "logits paths build both models' `[B, L, V]` logits. The fused step's gradients are "
        "its outputs' own buffers; in bf16 the hidden states' gradient is summed in float32 "
        "per token chunk (two passes over the tiles), never as a whole `N d` float32 sum "
        f"({llama_sum / 2**20:,.0f} MiB at Llama 3's shape).",
        "",
        "## Compiled temporary memory (MiB)",
        "",
        *memory_table([r for r in rows if r["kind"] == "memory"], names, tpu=False),
    ]
    tpu_rows = [r for r in rows if r["kind"] == "tpu memory"]
    if tpu_rows:
        lines += [
            "",
            f"## Compiled for one chip of TPU {tpu_rows[0]['topology']} (deviceless; MiB)",
            "",
            "A program over the chip's memory does not compile; its figure is what XLA:TPU "
            "said it needed. XLA:TPU recomputes to fit a program in the chip's 16 GiB, so the "
            "logits paths' figures here are capped near it.",
            "",
            *memory_table(tpu_rows, names, tpu=True),
        ]
    lines += ["", "## Time per step (median ms; the ratio's quartiles over the rounds)", ""]
    table = []
    for r in (r for r in rows if r["kind"] == "time"):
        ratios = []
        for n in names[1:]:
            low, high = r[f"fused / {n} quartiles"]
            ratios.append(f"{r[f'fused / {n}']:.2f} ({low:.2f}-{high:.2f})")
        table.append([str(tuple(r["shape"])), r["dtype"], str(r["agree"])]
                     + [f"{r['seconds'][n] * 1e3:.1f}" for n in names] + ratios)  # fmt: skip
    columns = ["shape", "dtype", "agree", *names, *(f"fused / {n}" for n in names[1:])]
    lines += harness.markdown_table(columns, table)
    training.write_atomically(path, "\n".join(lines) + "\n")


def main(argv=None):
    parser = harness.benchmark_parser(
        __doc__,
        out=f"output folder; None: benchmarks/results/<device>/preference, or {QUICK_OUT} with "
        "--quick (a smoke run never replaces the committed results)",
        repeats="timed rounds; None: 8 (2 with --quick)",
    )
    parser.add_argument(
        "--tpu",
        action="store_true",
        help=f"also compile the steps for one chip of TPU {TPU_TOPOLOGY} at Llama 3's shape "
        "(needs libtpu; with ALLOW_MULTIPLE_LIBTPU_LOAD=1)",
    )
    args = parser.parse_args(argv)
    if args.tpu and importlib.util.find_spec("libtpu") is None:
        parser.error(f'--tpu needs libtpu: pip install "jax[tpu]=={jax.__version__}"')
    device = jax.devices()[0]
    out = harness.output_folder(args, QUICK_OUT, device.platform, "preference")
    repeats = args.repeats or (2 if args.quick else 8)
    memory_shapes = [QUICK_SHAPE] if args.quick else [LLAMA_SHAPE, MID_SHAPE]
    timed_shape = QUICK_SHAPE if args.quick else TIMED_SHAPE
    cases = []
    for dtype in (jnp.float32, jnp.bfloat16):
        name = jnp.dtype(dtype).name
        cases.append((f"memory {name}", lambda d=dtype: [case_memory(s, d) for s in memory_shapes]))
        if args.tpu:
            tpu_case = lambda d=dtype: [case_tpu_memory(memory_shapes[0], d)]
            cases.append((f"tpu memory {name}", tpu_case))
        cases.append((f"time {name}", lambda d=dtype: [case_time(timed_shape, d, repeats)]))
    settings = dict(quick=args.quick, repeats=repeats, tpu=args.tpu, device=str(device))
    rows = harness.run_cases(out, settings, cases, fresh=args.fresh)
    prefix = ("ALLOW_MULTIPLE_LIBTPU_LOAD=1",) if args.tpu else ()
    meta = dict(
        device=harness.device_model(device),
        command=harness.command("benchmark_preference.py", argv, prefix),
        jax=jax.__version__,
        jaxsoftmax=jaxsoftmax.__version__,
        optax=optax.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        quick=args.quick,
    )
    if args.tpu:
        meta["libtpu"] = importlib.metadata.version("libtpu")
    harness.write_results(out, meta, rows, write_markdown)
    print(f"wrote {out}/results.json and results.md")
    return rows


if __name__ == "__main__":
    main()
