"""Benchmark: the fused distillation loss against the logits-then-loss paths users write today.

Three ways to get a student's loss and gradients (hidden states and classifier; the teacher
frozen) from a student's and a teacher's last hidden states and classifiers:

* ``fused``: ``jaxsoftmax.linear_distillation_loss``, which never builds either ``[N, V]``
  logits;
* ``logits + ours``: both logits, then ``jaxsoftmax.distillation_loss`` (the derived rule);
* ``logits + optax``: both logits, then ``T^2`` times optax's ``kl_divergence`` of the
  tempered ``log_softmax`` against the teacher's ``softmax`` (forward KL only).

Every competitor is first checked against the others (value and gradients), then compiled
once and timed in interleaved rounds (``harness.time_rounds``: each call ended by
``block_until_ready``, the median reported, with the quartiles of the per-round ratios).
Memory is the compiled program's temporary bytes (``memory_analysis()``), at the shape of
Gemma 2 2B distilled into a student of the same shape (compiled only, never run here).

    python experiments/benchmark_distillation.py     # writes benchmarks/results/<device>/distillation/
    python experiments/benchmark_distillation.py --quick     # writes runs/benchmark-distillation-quick/

An interrupted run, started again with the same flags, resumes after its last finished case
(``--fresh`` starts over); the results are written atomically at the end.
"""

from __future__ import annotations

import os
import platform
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # helper modules of the scripts: the timing, memory and resuming helpers

import jaxsoftmax
from jaxsoftmax import distillation_loss, linear_distillation_loss, training

TEMPERATURE = 2.0
GEMMA = (8192, 2304, 2304, 256000)  # (N, d_student, d_teacher, V)
QUICK_OUT = os.path.join("runs", "benchmark-distillation-quick")  # never committed


def competitors(divergence: str) -> dict:
    """``name -> loss(h_s, w_s, h_t, w_t)`` for this divergence (optax: forward KL only)."""
    options = dict(divergence=divergence, temperature=TEMPERATURE)
    if divergence == "jsd":
        options["beta"] = 0.5
    found = {
        "fused": lambda h_s, w_s, h_t, w_t: linear_distillation_loss(h_s, w_s, h_t, w_t, **options),
        "logits + ours": lambda h_s, w_s, h_t, w_t: distillation_loss(
            h_s @ w_s.T, h_t @ w_t.T, **options
        ),
    }
    if divergence == "forward_kl":

        def optax_loss(h_s, w_s, h_t, w_t):
            student = jax.nn.log_softmax((h_s @ w_s.T).astype(jnp.float32) / TEMPERATURE)
            teacher = jax.nn.softmax((h_t @ w_t.T).astype(jnp.float32) / TEMPERATURE)
            kl = optax.losses.kl_divergence(student, teacher)
            return (TEMPERATURE**2 * jnp.mean(kl)).astype(h_s.dtype)

        found["logits + optax"] = optax_loss
    return found


def student_step(loss):
    """The loss and the student's gradients (hidden states, classifier), compiled."""
    return jax.jit(jax.value_and_grad(loss, (0, 1)))


def inputs(n, d_s, d_t, v, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (
        jax.random.normal(keys[0], (n, d_s), dtype),
        (jax.random.normal(keys[1], (v, d_s), jnp.float32) / d_s**0.5).astype(dtype),
        jax.random.normal(keys[2], (n, d_t), dtype),
        (jax.random.normal(keys[3], (v, d_t), jnp.float32) / d_t**0.5).astype(dtype),
    )


def case_time(shape, dtype, divergence, repeats):
    """One timed row: seconds per call of each competitor and the fused one's ratios."""
    args = inputs(*shape, dtype)
    steps = {name: student_step(loss) for name, loss in competitors(divergence).items()}
    results = {name: step(*args) for name, step in steps.items()}
    agreement = harness.agree(results, dtype)
    rounds = harness.time_rounds({n: (lambda s=s: s(*args)) for n, s in steps.items()}, repeats)
    seconds = harness.medians(rounds)
    row = dict(kind="time", shape=list(shape), dtype=jnp.dtype(dtype).name,
               divergence=divergence, agree=agreement, seconds=seconds)  # fmt: skip
    for name in seconds:
        if name != "fused":
            row[f"fused / {name}"] = seconds["fused"] / seconds[name]
            row[f"fused / {name} quartiles"] = harness.ratio_quartiles(rounds, "fused", name)
    print(f"[time] {shape} {row['dtype']} {divergence}: "
          + ", ".join(f"{n} {s * 1e3:.0f} ms" for n, s in seconds.items()), flush=True)  # fmt: skip
    return row


def case_memory(shape, dtype, divergence):
    """Compiled temporary bytes of each competitor at ``shape`` (nothing runs)."""
    n, d_s, d_t, v = shape
    s = jax.ShapeDtypeStruct
    specs = (s((n, d_s), dtype), s((v, d_s), dtype), s((n, d_t), dtype), s((v, d_t), dtype))
    found = {
        name: harness.temp_bytes(jax.value_and_grad(loss, (0, 1)), *specs)
        for name, loss in competitors(divergence).items()
    }
    row = dict(kind="memory", shape=list(shape), dtype=jnp.dtype(dtype).name,
               divergence=divergence, temp_bytes=found)  # fmt: skip
    for name in found:
        if name != "fused":
            row[f"{name} / fused"] = found[name] / found["fused"]
    print(f"[memory] {shape} {row['dtype']} {divergence}: "
          + ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in found.items()), flush=True)  # fmt: skip
    return row


def write_markdown(path, meta, rows):
    lines = [
        "# Fused distillation loss: time and memory against the logits-then-loss paths",
        "",
        f"Device: {meta['device']}; JAX {meta['jax']}, optax {meta['optax']}, Python "
        f"{meta['python']}; command: `{meta['command']}`. Student gradients (hidden states and "
        f"classifier), teacher frozen, temperature {TEMPERATURE}.",
        "",
        "## Compiled temporary memory (MiB)",
        "",
        "| shape (N, d_s, d_t, V) | dtype | divergence | fused | logits + ours | logits + optax "
        "| logits + ours / fused |",
        "|---|---|---|---|---|---|---|",
    ]
    mib = lambda row, name: (
        f"{row['temp_bytes'][name] / 2**20:.1f}" if name in row["temp_bytes"] else "-"
    )
    for r in (r for r in rows if r["kind"] == "memory"):
        lines.append(
            f"| {tuple(r['shape'])} | {r['dtype']} | {r['divergence']} | {mib(r, 'fused')} | "
            f"{mib(r, 'logits + ours')} | {mib(r, 'logits + optax')} | "
            f"{r['logits + ours / fused']:.0f}x |"
        )
    lines += [
        "",
        "## Time per step (median ms; ratio's quartiles over the rounds)",
        "",
        "| shape (N, d_s, d_t, V) | dtype | divergence | agree | fused | logits + ours | "
        "logits + optax | fused / logits + ours | fused / logits + optax |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["kind"] == "time"):
        ms = lambda name: f"{r['seconds'][name] * 1e3:.1f}" if name in r["seconds"] else "-"

        def ratio(name):
            if f"fused / {name}" not in r:
                return "-"
            low, high = r[f"fused / {name} quartiles"]
            return f"{r[f'fused / {name}']:.2f} ({low:.2f}-{high:.2f})"

        lines.append(
            f"| {tuple(r['shape'])} | {r['dtype']} | {r['divergence']} | {r['agree']} | "
            f"{ms('fused')} | {ms('logits + ours')} | {ms('logits + optax')} | "
            f"{ratio('logits + ours')} | {ratio('logits + optax')} |"
        )
    training.write_atomically(path, "\n".join(lines) + "\n")


def main(argv=None):
    parser = harness.benchmark_parser(
        __doc__,
        out=f"output folder; None: benchmarks/results/<device>/distillation, or {QUICK_OUT} "
        "with --quick (a smoke run never replaces the committed results)",
        repeats="timed rounds; None: 8 (2 with --quick)",
    )
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    out = harness.output_folder(args, QUICK_OUT, device.platform, "distillation")
    repeats = args.repeats or (2 if args.quick else 8)
    memory_shapes = [(64, 16, 24, 500)] if args.quick else [GEMMA]
    timed = [(64, 16, 24, 500)] if args.quick else [(2048, 512, 1024, 32768)]
    cases = []
    for dtype in (jnp.float32, jnp.bfloat16):
        for divergence in ("forward_kl", "jsd"):
            name = f"{jnp.dtype(dtype).name} {divergence}"
            cases.append((f"memory {name}", lambda d=dtype, k=divergence: [
                case_memory(shape, d, k) for shape in memory_shapes]))  # fmt: skip
            cases.append((f"time {name}", lambda d=dtype, k=divergence: [
                case_time(shape, d, k, repeats) for shape in timed]))  # fmt: skip
    settings = dict(quick=args.quick, repeats=repeats, device=str(device))
    rows = harness.run_cases(out, settings, cases, fresh=args.fresh)
    meta = dict(
        device=harness.device_model(device),
        command=harness.command("benchmark_distillation.py", argv),
        jax=jax.__version__,
        optax=optax.__version__,
        jaxsoftmax=jaxsoftmax.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        quick=args.quick,
    )
    harness.write_results(out, meta, rows, write_markdown)
    print(f"wrote {out}/results.json and results.md")
    return rows


if __name__ == "__main__":
    main()
