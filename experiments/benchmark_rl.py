"""Benchmark: a fused GRPO step against the logits paths users write today.

Three ways to get a GRPO loss (with an entropy bonus) and its gradients with respect to the
hidden states and the classifier, from the last hidden states of ``B`` sampled sequences:

* ``fused``: ``jaxsoftmax.linear_token_log_probs`` (log-probabilities and entropy from the
  hidden states, never building the ``[N, V]`` logits), then ``jaxsoftmax.policy_gradient_loss``;
* ``logits + ours``: the logits, then ``jaxsoftmax.token_log_probs`` and the same loss;
* ``logits + jax.nn``: the logits, ``jax.nn.log_softmax`` gathered and its entropy, then the
  same loss (what trainers write by hand).

Every competitor is first checked against the others (value and gradients), then compiled once
and timed in interleaved rounds (``harness.time_rounds``; the median and the quartiles of the
per-round ratios). Memory is the compiled program's temporary bytes (``memory_analysis()``) at
an RL shape: N = 8192 tokens (8 sequences of 1024), d = 2048, Qwen 2.5's V = 151936 (compiled
only, never run here).

    python experiments/benchmark_rl.py          # writes benchmarks/results/<device>/rl/
    python experiments/benchmark_rl.py --quick  # writes runs/benchmark-rl-quick/

An interrupted run, started again with the same flags, resumes after its last finished case
(``--fresh`` starts over); the results are written atomically at the end.
"""

from __future__ import annotations

import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # helper modules of the scripts: the timing, memory and resuming helpers

import jaxsoftmax
from jaxsoftmax import linear_token_log_probs, policy_gradient_loss, token_log_probs, training

TEMPERATURE, ENTROPY_COEF = 0.8, 0.01
RL_SHAPE = (8, 1024, 2048, 151936)  # (B sequences, L tokens each, d, V)
TIMED_SHAPE = (4, 512, 512, 32768)  # N = 2048 tokens, the fused loss's benchmark shape
QUICK_SHAPE = (2, 32, 16, 500)
QUICK_OUT = os.path.join("runs", "benchmark-rl-quick")  # never committed


def naive_log_probs(h, w, tokens):
    """``log_softmax(z / T)`` gathered and its entropy, from the materialised logits."""
    log_p_all = jax.nn.log_softmax((h @ w.T).astype(jnp.float32) / TEMPERATURE)
    log_p = jnp.take_along_axis(log_p_all, tokens[..., None], -1)[..., 0]
    return log_p, -jnp.sum(jnp.exp(log_p_all) * log_p_all, -1)


SCORERS = {
    "fused": lambda h, w, y: linear_token_log_probs(
        h, w, y, temperature=TEMPERATURE, return_entropy=True
    ),
    "logits + ours": lambda h, w, y: token_log_probs(
        h @ w.T, y, temperature=TEMPERATURE, return_entropy=True
    ),
    "logits + jax.nn": naive_log_probs,
}


def grpo_step(score):
    """``value_and_grad`` of GRPO's loss with respect to hidden states and classifier."""

    def loss(h, w, tokens, mask, advantages, old_log_probs):
        log_p, entropy = score(h, w, tokens)
        value, _ = policy_gradient_loss(
            log_p, old_log_probs, advantages, mask=mask, entropy=entropy,
            entropy_coef=ENTROPY_COEF,
        )  # fmt: skip
        return value

    return jax.jit(jax.value_and_grad(loss, (0, 1)))


def inputs(b, length, d, v, dtype, seed=0):
    """Hidden states ``[B, L, d]``, a classifier ``[V, d]``, sampled tokens, a mask of each
    sequence's length, group-normalised advantages and the sampler's log-probabilities."""
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(b, length, d)), dtype)
    w = jnp.asarray(rng.normal(size=(v, d)) / d**0.5, dtype)
    tokens = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
    lengths = rng.integers(length // 2, length + 1, b)
    mask = jnp.asarray(np.arange(length)[None, :] < lengths[:, None])
    rewards = rng.random(b)
    advantages = jnp.asarray((rewards - rewards.mean()) / (rewards.std() + 1e-4), jnp.float32)
    old = linear_token_log_probs(h, w, tokens, temperature=TEMPERATURE) + jnp.asarray(
        rng.normal(size=(b, length)) * 0.05, jnp.float32
    )  # a sampler slightly behind the policy: some ratios clipped
    return h, w, tokens, mask, advantages, old


def case_time(shape, dtype, repeats):
    """One timed row: seconds per step of each competitor and the fused one's ratios."""
    args = inputs(*shape, dtype)
    steps = {name: grpo_step(score) for name, score in SCORERS.items()}
    results = {name: step(*args) for name, step in steps.items()}
    agreement = harness.agree(results, dtype)
    rounds = harness.time_rounds({n: (lambda s=s: s(*args)) for n, s in steps.items()}, repeats)
    seconds = harness.medians(rounds)
    row = dict(kind="time", shape=list(shape), dtype=jnp.dtype(dtype).name, agree=agreement,
               seconds=seconds)  # fmt: skip
    for name in seconds:
        if name != "fused":
            row[f"fused / {name}"] = seconds["fused"] / seconds[name]
            row[f"fused / {name} quartiles"] = harness.ratio_quartiles(rounds, "fused", name)
    print(f"[time] {shape} {row['dtype']}: "
          + ", ".join(f"{n} {s * 1e3:.0f} ms" for n, s in seconds.items()), flush=True)  # fmt: skip
    return row


def case_memory(shape, dtype):
    """Compiled temporary bytes of each competitor's step at ``shape`` (nothing runs)."""
    b, length, d, v = shape
    s = jax.ShapeDtypeStruct
    specs = (s((b, length, d), dtype), s((v, d), dtype), s((b, length), jnp.int32),
             s((b, length), jnp.bool_), s((b,), jnp.float32), s((b, length), jnp.float32))  # fmt: skip
    found = {name: harness.temp_bytes(grpo_step(score), *specs) for name, score in SCORERS.items()}
    row = dict(kind="memory", shape=list(shape), dtype=jnp.dtype(dtype).name, temp_bytes=found)
    for name in found:
        if name != "fused":
            row[f"{name} / fused"] = found[name] / found["fused"]
    print(f"[memory] {shape} {row['dtype']}: "
          + ", ".join(f"{n} {x / 2**20:.1f} MiB" for n, x in found.items()), flush=True)  # fmt: skip
    return row


def write_markdown(path, meta, rows):
    names = list(SCORERS)
    lines = [
        "# A fused GRPO step: time and memory against the logits paths",
        "",
        f"Device: {meta['device']}; JAX {meta['jax']}, Python {meta['python']}; command: "
        f"`{meta['command']}`. GRPO's loss (`policy_gradient_loss`'s defaults) with an entropy "
        f"bonus ({ENTROPY_COEF}), temperature {TEMPERATURE}; gradients of the hidden states and "
        "the classifier. Shapes are (B sequences, L tokens, d, V).",
        "",
        "## Compiled temporary memory (MiB)",
        "",
    ]
    table = []
    for r in (r for r in rows if r["kind"] == "memory"):
        table.append([str(tuple(r["shape"])), r["dtype"]]
                     + [f"{r['temp_bytes'][n] / 2**20:,.1f}" for n in names]
                     + [f"{r[f'{n} / fused']:,.0f}x" for n in names[1:]])  # fmt: skip
    columns = ["shape", "dtype", *names, *(f"{n} / fused" for n in names[1:])]
    lines += harness.markdown_table(columns, table)
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
        out=f"output folder; None: benchmarks/results/<device>/rl, or {QUICK_OUT} with --quick "
        "(a smoke run never replaces the committed results)",
        repeats="timed rounds; None: 8 (2 with --quick)",
    )
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    out = harness.output_folder(args, QUICK_OUT, device.platform, "rl")
    repeats = args.repeats or (2 if args.quick else 8)
    memory_shape = QUICK_SHAPE if args.quick else RL_SHAPE
    timed_shape = QUICK_SHAPE if args.quick else TIMED_SHAPE
    cases = []
    for dtype in (jnp.float32, jnp.bfloat16):
        name = jnp.dtype(dtype).name
        cases.append((f"memory {name}", lambda d=dtype: [case_memory(memory_shape, d)]))
        cases.append((f"time {name}", lambda d=dtype: [case_time(timed_shape, d, repeats)]))
    settings = dict(quick=args.quick, repeats=repeats, device=str(device))
    rows = harness.run_cases(out, settings, cases, fresh=args.fresh)
    meta = dict(
        device=harness.device_model(device),
        command=harness.command("benchmark_rl.py", argv),
        jax=jax.__version__,
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
