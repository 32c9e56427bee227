"""Benchmarks: jaxsoftmax against what users would otherwise pick, with pass/fail targets.

Every case first checks that the competitors agree, compiles once (warm-up), then times
``repeats`` rounds in which the competitors run one after the other (interleaved, so
machine drift hits them alike), each call ended by ``block_until_ready``; the median is
reported. A repeat of a call faster than 20 ms times as many calls as fill 20 ms, and fast
cases get more rounds (``rounds_for``). Memory is the compiled program's
``memory_analysis()`` (temporary bytes).

Cases:
  1. loss + gradient with integer labels: cross_entropy vs optax vs jax.grad of the naive
     textbook composition (softmax, log, one-hot, mean) vs torch F.cross_entropy; targets
     ratio <= 1.0 vs optax and <= 0.15 vs naive. On an accelerator, also up to
     (32768, 131072) where the naive composition fits in its memory (``naive_fits``).
  2. linear_cross_entropy vs logits-then-optax and, where installed (Python >= 3.12),
     tokamax's chunked XLA loss, loss + both gradients; targets at the Gemma-2-2B shape
     (compiled only, never run here): >= 300x fewer temporary bytes than the naive path in
     float32, >= 50x in bf16, and at most tokamax's in both; at N=2048, d=512, V=32768 time
     <= naive with the classifier as [V, d], and <= the faster of naive and tokamax with
     it as a [d, V] kernel. On an accelerator it is also timed at
     d=2304, V=256000 with the largest N whose naive path fits in the device's memory
     (``largest_naive_fit``).
  3. the spiral case study end to end (compilation included) vs NumPy (CS231n style) and
     torch eager; target >= 4x faster than NumPy. Beside it, the wall time of the whole
     ``python experiments/train.py`` process with JAX's persistent compilation cache empty
     and filled (``main_job_seconds``).
  4. ``linear_cross_entropy(..., gradient_filter=eps)`` on the logits of the language model
     ``experiments/language_model.py`` trained (``experiments/gradient_filter.py``): time
     against the exact gradient and the gradients' relative error; skipped, with a line in
     the results, when no trained model is found.

Usage::

  python experiments/benchmark.py            # full run, writes benchmarks/results/<device>/
  python experiments/benchmark.py --quick    # smoke run in seconds, writes runs/benchmark-quick/

Each finished case is saved in ``<out>/.partial.json``; run the same command again after an
interruption and it goes on from the first unfinished case (``--fresh`` starts over). The
result files are written atomically, once every case has run.
"""

from __future__ import annotations

import functools
import io
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # helper modules of the scripts
from harness import (
    compiled_memory,
    medians,
    memory_setting,
    ratio_quartiles,
    round_orders,
    run_cases,
    temp_bytes,
    time_interleaved,
    time_rounds,
)

import jaxsoftmax
from jaxsoftmax import cross_entropy, linear_cross_entropy, training
from jaxsoftmax.core import plain_path_only
from jaxsoftmax.tiles import auto_method

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is optional
    torch = None

try:  # tokamax needs Python >= 3.12: pip install -e ".[bench]" there
    import tokamax
except ImportError:
    tokamax = None

GEMMA = (8192, 2304, 256000)
QUICK_OUT = os.path.join("runs", "benchmark-quick")  # a smoke run's results, never committed


def torch_device() -> str | None:
    """Where PyTorch runs beside JAX: on JAX's GPU when JAX runs on one, else on the CPU.

    None without PyTorch, or when JAX runs on a GPU and this PyTorch has no CUDA: a CPU PyTorch
    against a GPU JAX would compare the devices, not the code.
    """
    if torch is None:
        return None
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    return "cuda" if backend == "gpu" and torch.cuda.is_available() else None


def on_cpu() -> bool:
    """Whether JAX runs on the CPU, whose programs take the fast paths of
    ``jaxsoftmax/core/cpu_programs.py``; every other backend compiles the plain rule."""
    return jax.default_backend() == "cpu"


def compiled_plain(fn, *args):
    """``jit(fn)`` compiled ahead of time with the plain rule on every platform, the CPU
    included: the program a GPU or TPU gets, to measure what the CPU's fast paths buy."""
    with plain_path_only():
        return jax.jit(fn).lower(*args).compile()


# ----------------------------------------------------------------------------- case 1


def _naive_loss(logits, labels):
    """The textbook composition: softmax, log, one-hot, mean; differentiated by autodiff."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return -jnp.mean(jnp.sum(onehot * jnp.log(probs), axis=-1))


def case_one_agrees(results: dict, dtype) -> bool:
    """Whether every competitor's ``(loss, gradient)`` in ``results`` matches optax's.

    The loss within ``1e-4`` (float32) or ``2e-2`` (bf16), relative or absolute; each gradient
    entry within that tolerance over ``N`` (a mean's gradient is a softmax over ``N``), plus
    ``1e-6``. PyTorch's results are compared like the others once converted to float32 NumPy.
    """
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    ref_loss, ref_grad = (np.asarray(a, np.float32) for a in results["optax"])
    n = ref_grad.shape[0]
    return all(
        np.allclose(np.asarray(loss, np.float32), ref_loss, rtol=tol, atol=tol)
        and np.allclose(np.asarray(grad, np.float32), ref_grad, atol=tol / n + 1e-6)
        for loss, grad in results.values()
    )


def case_integer_labels(shapes, dtypes, repeats):
    rows = []
    competitors = {
        "jaxsoftmax": lambda z, y: cross_entropy(z, y),
        "optax": lambda z, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y)),
        "naive": _naive_loss,
    }
    for dtype in dtypes:
        for n, c in shapes:
            key = jax.random.split(jax.random.key(n + c), 2)
            z = (jax.random.normal(key[0], (n, c)) * 2).astype(dtype)
            y = jax.random.randint(key[1], (n,), 0, c)
            fns = {name: jax.jit(jax.value_and_grad(f)) for name, f in competitors.items()}
            outs = {name: fn(z, y) for name, fn in fns.items()}
            calls = {name: functools.partial(fn, z, y) for name, fn in fns.items()}
            device = torch_device()
            torch_note = (
                "torch not installed"
                if torch is None
                else "torch without CUDA: not compared with JAX on the GPU"
            )
            if device is not None:
                tz = torch.tensor(
                    np.asarray(z.astype(jnp.float32)),
                    dtype=torch.float32 if dtype == jnp.float32 else torch.bfloat16,
                    device=device,
                )
                ty = torch.tensor(np.asarray(y), dtype=torch.long, device=device)

                def torch_step(tz=tz, ty=ty):
                    x = tz.detach().requires_grad_(True)
                    loss = F.cross_entropy(x, ty)
                    loss.backward()
                    return (loss.detach(), x.grad)

                outs["torch"] = tuple(t.float().cpu().numpy() for t in torch_step())
                calls["torch"] = torch_step
                torch_note = f"torch {torch.__version__} eager on {device}"
            # read from the programs compiled above (jit's cache returns them), not compiled anew
            memory = {
                name: int(fn.lower(z, y).compile().memory_analysis().temp_size_in_bytes)
                for name, fn in fns.items()
            }
            if on_cpu():  # the plain rule, what GPUs and TPUs get, beside the CPU's fast path
                plain = compiled_plain(jax.value_and_grad(competitors["jaxsoftmax"]), z, y)
                outs["plain"], calls["plain"] = plain(z, y), functools.partial(plain, z, y)
                memory["plain"] = int(plain.memory_analysis().temp_size_in_bytes)
            agree = case_one_agrees(outs, dtype)
            rounds = time_rounds(calls, repeats)
            seconds = medians(rounds)
            row = dict(
                case=1,
                dtype=jnp.dtype(dtype).name,
                n=n,
                classes=c,
                agree=bool(agree),
                seconds=seconds,
                temp_bytes=memory,
                torch=torch_note,
                ratio_vs_optax=seconds["jaxsoftmax"] / seconds["optax"],
                ratio_vs_naive=seconds["jaxsoftmax"] / seconds["naive"],
                rounds=len(rounds),
                ratio_vs_optax_quartiles=ratio_quartiles(rounds, "jaxsoftmax", "optax"),
            )
            if "torch" in seconds:
                row["ratio_vs_torch"] = seconds["jaxsoftmax"] / seconds["torch"]
            if "plain" in seconds:
                row["ratio_fast_vs_plain"] = seconds["jaxsoftmax"] / seconds["plain"]
                row["ratio_plain_vs_optax"] = seconds["plain"] / seconds["optax"]
            row["meets_optax_target"] = row["ratio_vs_optax"] <= 1.0
            row["meets_naive_target"] = row["ratio_vs_naive"] <= 0.15
            rows.append(row)
            print(
                f"[1] {row['dtype']} ({n}, {c}): vs optax {row['ratio_vs_optax']:.2f} "
                f"(rounds' middle half {spread(row['ratio_vs_optax_quartiles'])}; target <= 1.0: "
                f"{'met' if row['meets_optax_target'] else 'MISSED'}), vs naive "
                f"{row['ratio_vs_naive']:.3f} (target <= 0.15: "
                f"{'met' if row['meets_naive_target'] else 'MISSED'}), agree={agree}",
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------- case 2


def _naive_linear(h, w, y):
    return jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels((h @ w.T).astype(jnp.float32), y)
    )


def _naive_linear_dv(h, k, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels((h @ k).astype(jnp.float32), y))


def _tokamax_linear(h, k, y):
    """tokamax's fused loss, its chunked XLA implementation (the one for every backend),
    classifier as ``[d, V]``; None where tokamax is not installed."""
    return tokamax.linear_softmax_cross_entropy_loss(
        h, y, k, reduction="mean", implementation="chunked_xla"
    )


def tokamax_version() -> str:
    if tokamax is None:
        return "not installed"
    from importlib.metadata import version

    return version("tokamax")


def fits_in_memory(device, fn, *args) -> bool | None:
    """Whether ``jit(fn)(*args)`` fits in 90% of ``device``'s allocator limit, from its compiled
    program (arguments, outputs and temporaries, known before it runs); None where the device
    reports no limit (the CPU)."""
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if not limit:
        return None
    memory = compiled_memory(fn, *args)
    needed = memory.argument_size_in_bytes + memory.output_size_in_bytes
    return needed + memory.temp_size_in_bytes <= 0.9 * limit


def largest_naive_fit(device, d, v, dtype, rows=(65536, 32768, 16384, 8192, 4096, 2048)):
    """The largest ``(N, d, v)`` of ``rows`` whose naive path fits in ``device``'s memory.

    Case 2's shape "as large as the accelerator's memory allows": the naive path (logits then
    optax, loss and both gradients) is what runs out first. None where the device reports no
    memory limit (the CPU) or nothing fits.
    """
    s = jax.ShapeDtypeStruct
    naive = jax.value_and_grad(_naive_linear, (0, 1))
    for n in sorted(rows, reverse=True):
        args = (s((n, d), dtype), s((v, d), dtype), s((n,), jnp.int32))
        if fits_in_memory(device, naive, *args):
            return (n, d, v)
    return None


def naive_fits(device, shapes):
    """The ``(N, C)`` of ``shapes`` where case 1's naive composition (its largest competitor)
    fits in ``device``'s memory in float32; none where the device reports no limit."""
    s = jax.ShapeDtypeStruct
    naive = jax.value_and_grad(_naive_loss)
    return [
        (n, c)
        for n, c in shapes
        if fits_in_memory(device, naive, s((n, c), jnp.float32), s((n,), jnp.int32))
    ]


def _linear_row(kind: str, dtype, shape: tuple[int, int, int], **measured) -> dict:
    """A row of case 2: its ``kind`` ("memory" or "time"), dtype, shape ``(n, d, v)``, what was
    ``measured``, and the method ``linear_cross_entropy`` chose."""
    n, d, v = shape
    return dict(
        case=2, kind=kind, dtype=jnp.dtype(dtype).name, n=n, d=d, v=v, **measured,
        method=auto_method(v, d, "mean"),
    )  # fmt: skip


def case_linear(timed_shapes, memory_shapes, dtypes, repeats):
    rows = []
    fused = lambda h, w, y: linear_cross_entropy(h, w, y)  # method="auto"
    recompute = lambda h, w, y: linear_cross_entropy(h, w, y, method="recompute")
    fused_dv = lambda h, k, y: linear_cross_entropy(h, k, y, classifier_layout="dv")
    grads = lambda f: jax.value_and_grad(f, (0, 1))
    s = jax.ShapeDtypeStruct
    for dtype in dtypes:
        for n, d, v in memory_shapes:
            args = (s((n, d), dtype), s((v, d), dtype), s((n,), jnp.int32))
            args_dv = (s((n, d), dtype), s((d, v), dtype), s((n,), jnp.int32))
            memory = {
                "fused": temp_bytes(grads(fused), *args),
                "naive": temp_bytes(grads(_naive_linear), *args),
                "fused_dv": temp_bytes(grads(fused_dv), *args_dv),
                "naive_dv": temp_bytes(grads(_naive_linear_dv), *args_dv),
            }
            if tokamax is not None:
                memory["tokamax"] = temp_bytes(grads(_tokamax_linear), *args_dv)
            if on_cpu():
                plain = compiled_plain(grads(fused), *args)
                memory["fused_plain"] = int(plain.memory_analysis().temp_size_in_bytes)
            ratio = memory["naive"] / memory["fused"]
            row = _linear_row("memory", dtype, (n, d, v), temp_bytes=memory, memory_ratio=ratio)
            if (n, d, v) == GEMMA:
                # at least 50x below the naive path, 300x in float32 (where it is logits only)
                row["memory_target"] = 300 if dtype == jnp.float32 else 50
                row["meets_memory_target"] = ratio >= row["memory_target"]
                if "tokamax" in memory:  # and at most tokamax's, both as [d, V] kernels
                    row["meets_tokamax_memory_target"] = memory["fused_dv"] <= memory["tokamax"]
            rows.append(row)
            print(
                f"[2] memory {row['dtype']} N={n} d={d} V={v}: fused {memory['fused'] / 2**20:.0f} "
                f"MiB, naive {memory['naive'] / 2**20:.0f} MiB, ratio {ratio:.1f}"
                + (
                    f" (target >= {row['memory_target']}: "
                    f"{'met' if row['meets_memory_target'] else 'MISSED'})"
                    if (n, d, v) == GEMMA
                    else ""
                )
                + f"; [d,V] fused {memory['fused_dv'] / 2**20:.0f} MiB"
                + (f", tokamax {memory['tokamax'] / 2**20:.0f} MiB" if "tokamax" in memory else ""),
                flush=True,
            )
        for n, d, v in timed_shapes:
            key = jax.random.split(jax.random.key(n + v), 3)
            h = jax.random.normal(key[0], (n, d)).astype(dtype)
            w = (jax.random.normal(key[1], (v, d)) / np.sqrt(d)).astype(dtype)
            y = jax.random.randint(key[2], (n,), 0, v)
            f_fused, f_naive = jax.jit(grads(fused)), jax.jit(grads(_naive_linear))
            f_recompute = jax.jit(grads(recompute))
            k = w.T.copy()  # [d, V], for the kernel-layout competitors
            f_fused_dv, f_naive_dv = jax.jit(grads(fused_dv)), jax.jit(grads(_naive_linear_dv))
            f_tokamax = None
            if tokamax is not None:
                f_tokamax = jax.jit(grads(_tokamax_linear))
            # Agreement of the algorithms, with float32 products in float32: on a recent NVIDIA
            # GPU the default rounds them to TensorFloat-32, and the fused loss's chunked
            # products and the naive path's whole one would then differ by that rounding.
            # The timing below runs at the default precision, as users' code does.
            # tokamax's kernel gradient is [d, V]: transposed to be compared with the others.
            with jax.default_matmul_precision("float32"):
                naive_out = f_naive(h, w, y)
                outs = {"fused": f_fused(h, w, y), "recompute": f_recompute(h, w, y)}
                for name, f in (("fused_dv", f_fused_dv), ("tokamax", f_tokamax)):
                    if f is not None:
                        value, (d_h, d_k) = f(h, k, y)
                        outs[name] = (value, (d_h, d_k.T))
            tol = 1e-3 if dtype == jnp.float32 else 5e-2
            agrees = {
                name: all(
                    np.allclose(
                        np.asarray(p, np.float32),
                        np.asarray(q, np.float32),
                        rtol=tol,
                        atol=tol * float(np.max(np.abs(np.asarray(q, np.float32)))),
                    )
                    for p, q in zip(jax.tree.leaves(out), jax.tree.leaves(naive_out))
                )
                for name, out in outs.items()
            }
            # Ours must agree; tokamax's verdict is reported beside it (its chunked loss pads V
            # to a multiple of its 2048-class block with zero logits that enter the sum).
            agree = all(ok for name, ok in agrees.items() if name != "tokamax")
            callables = {
                "fused": functools.partial(f_fused, h, w, y),
                "recompute": functools.partial(f_recompute, h, w, y),
                "naive": functools.partial(f_naive, h, w, y),
                "fused_dv": functools.partial(f_fused_dv, h, k, y),
                "naive_dv": functools.partial(f_naive_dv, h, k, y),
            }
            if f_tokamax is not None:
                callables["tokamax"] = functools.partial(f_tokamax, h, k, y)
            if on_cpu():
                callables["fused_plain"] = functools.partial(
                    compiled_plain(grads(fused), h, w, y), h, w, y
                )
            seconds = time_interleaved(callables, repeats)
            # [V, d]: against the naive path; [d, V]: against the faster of it and tokamax
            ratio = seconds["fused"] / seconds["naive"]
            # (tokamax counts where its values agree: a wrong answer is no competitor)
            tokamax_seconds = (
                seconds.get("tokamax", math.inf) if agrees.get("tokamax") else math.inf
            )
            best = min(seconds["naive_dv"], tokamax_seconds)
            ratio_best = seconds["fused_dv"] / best
            row = _linear_row(
                "time",
                dtype,
                (n, d, v),
                agree=bool(agree),
                **({"tokamax_agrees": bool(agrees["tokamax"])} if "tokamax" in agrees else {}),
                seconds=seconds,
                time_ratio=ratio,
                time_ratio_vs_best=ratio_best,
                meets_time_target=max(ratio, ratio_best) <= 1.0,
            )
            rows.append(row)
            print(
                f"[2] time {row['dtype']} N={n} d={d} V={v}: fused/naive {ratio:.2f}, [d,V] "
                f"fused/best of naive and tokamax {ratio_best:.2f} (targets <= 1.0: "
                f"{'met' if row['meets_time_target'] else 'MISSED'}), agree={agree}"
                + (f", tokamax agrees={agrees['tokamax']}" if "tokamax" in agrees else ""),
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------- case 3


def spiral(points_per_class=100, classes=3, seed=0):
    """CS231n's spiral: ``classes`` arms of ``points_per_class`` noisy points in 2-D."""
    rng = np.random.default_rng(seed)
    x = np.zeros((points_per_class * classes, 2), np.float32)
    y = np.zeros(points_per_class * classes, np.int32)
    for k in range(classes):
        index = slice(points_per_class * k, points_per_class * (k + 1))
        radius = np.linspace(0.0, 1, points_per_class)
        angle = (
            np.linspace(k * 4, (k + 1) * 4, points_per_class)
            + rng.standard_normal(points_per_class) * 0.2
        )
        x[index] = np.c_[radius * np.sin(angle), radius * np.cos(angle)]
        y[index] = k
    return x, y


def init_params(hidden=100, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return [
        0.01 * rng.standard_normal((2, hidden)).astype(np.float32),
        np.zeros(hidden, np.float32),
        0.01 * rng.standard_normal((hidden, classes)).astype(np.float32),
        np.zeros(classes, np.float32),
    ]


def train_numpy(x, y, params, steps, step_size=1.0, reg=1e-3):
    """Full-batch gradient descent with the hand-derived backward, as the CS231n notes do."""
    w1, b1, w2, b2 = [p.copy() for p in params]
    n = x.shape[0]
    for _ in range(steps):
        hidden = np.maximum(0, x @ w1 + b1)
        scores = hidden @ w2 + b2
        scores = scores - scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=1, keepdims=True)
        loss = -np.log(probs[np.arange(n), y]).mean() + 0.5 * reg * (
            np.sum(w1 * w1) + np.sum(w2 * w2)
        )
        d_scores = probs
        d_scores[np.arange(n), y] -= 1  # softmax(z) - y, the derived result (docs/derivation.md)
        d_scores /= n
        d_w2 = hidden.T @ d_scores + reg * w2
        d_b2 = d_scores.sum(axis=0)
        d_hidden = d_scores @ w2.T
        d_hidden[hidden <= 0] = 0
        d_w1 = x.T @ d_hidden + reg * w1
        d_b1 = d_hidden.sum(axis=0)
        w1 -= step_size * d_w1
        b1 -= step_size * d_b1
        w2 -= step_size * d_w2
        b2 -= step_size * d_b2
    return loss


def train_jax(x, y, params, steps, step_size=1.0, reg=1e-3):
    """The same training with jaxsoftmax's loss, all steps in one compiled lax.scan."""

    def loss_fn(p):
        w1, b1, w2, b2 = p
        hidden = jax.nn.relu(x @ w1 + b1[None, :])
        data = cross_entropy(hidden @ w2 + b2[None, :], y)
        return data + 0.5 * reg * (jnp.sum(w1 * w1) + jnp.sum(w2 * w2))

    @jax.jit
    def run(p):
        def step(p, _):
            loss, g = jax.value_and_grad(loss_fn)(p)
            return [a - step_size * b for a, b in zip(p, g)], loss

        p, losses = jax.lax.scan(step, p, None, length=steps)
        return losses[-1]

    return run([jnp.asarray(a) for a in params])


def train_library(steps):
    """``jaxsoftmax.training.train`` with its CS231n defaults, where that module exists."""
    from jaxsoftmax import data, training

    config = training.TrainConfig(steps=steps, eval_every=steps, checkpoint_every=steps)
    result = training.train(config, data.load("spiral"))
    return result


def train_torch(x, y, params, steps, step_size=1.0, reg=1e-3, device="cpu"):
    p = [torch.tensor(a, requires_grad=True, device=device) for a in params]
    tx, ty = torch.tensor(x, device=device), torch.tensor(y, dtype=torch.long, device=device)
    for _ in range(steps):
        hidden = torch.relu(tx @ p[0] + p[1])
        loss = F.cross_entropy(hidden @ p[2] + p[3], ty) + 0.5 * reg * (
            (p[0] ** 2).sum() + (p[2] ** 2).sum()
        )
        for a in p:
            a.grad = None
        loss.backward()
        with torch.no_grad():
            for a in p:
                a -= step_size * a.grad
    return loss.item()


def spiral_runs_agree(final_loss: dict) -> bool:
    """Whether the spiral runs trained alike, from their final losses.

    NumPy, the bare scan and PyTorch train the same network from the same parameters on the same
    points: their losses differ by rounding only (0.5% after 10,000 float32 steps). The
    library's trainer draws its own parameters and its own spiral, so it is held to 10% of
    NumPy's loss (it measured 0.244 against 0.244 after 10,000 steps, 0.689 against 0.664
    after 200).
    """
    reference = final_loss["numpy"]
    alike = all(
        abs(loss - reference) <= 0.02 * reference
        for name, loss in final_loss.items()
        if name != "jaxsoftmax"
    )
    return bool(alike and abs(final_loss["jaxsoftmax"] - reference) <= 0.1 * reference)


def case_spiral(steps, repeats):
    """The library's trainer, and the bare compiled scan as the floor any JAX trainer pays."""
    x, y = spiral()
    params = init_params()

    def cold(train):  # JAX's caches emptied first: every call traces and compiles anew
        def run():
            jax.clear_caches()
            return train()

        return run

    runs = {
        "numpy": lambda: train_numpy(x, y, params, steps),
        "jaxsoftmax": cold(lambda: train_library(steps).final_loss),
        "jax_scan": cold(lambda: float(train_jax(x, y, params, steps))),
    }
    jax_kind = (
        "jaxsoftmax.training.train; jax_scan: a bare jitted lax.scan of cross_entropy (both "
        "compilation included)"
    )
    train_library(10)  # JAX's backend and the library's imports start outside the timing
    device = torch_device()
    if device is not None:
        runs["torch"] = lambda: train_torch(x, y, params, steps, device=device)
    seconds = {name: [] for name in runs}
    final = {}
    for order in round_orders(list(runs), repeats):  # as in time_rounds
        for name in order:
            start = time.perf_counter()
            final[name] = runs[name]()
            seconds[name].append(time.perf_counter() - start)
    seconds = {k: statistics.median(v) for k, v in seconds.items()}
    speedup = seconds["numpy"] / seconds["jaxsoftmax"]
    row = dict(
        case=3,
        steps=steps,
        jax=jax_kind,
        train_seconds=seconds,
        final_loss={name: float(loss) for name, loss in final.items()},
        agree=spiral_runs_agree(final),
        speedup_vs_numpy=speedup,
        meets_target=speedup >= 4.0,
    )
    if "torch" in seconds:
        row["speedup_vs_torch"] = seconds["torch"] / seconds["jaxsoftmax"]
    row["main_job_seconds"] = main_job_seconds(steps, repeats=min(repeats, 3))
    print(
        f"[3] spiral {steps} steps: numpy {seconds['numpy']:.2f}s, jaxsoftmax "
        f"{seconds['jaxsoftmax']:.2f}s -> {speedup:.1f}x (target >= 4: "
        f"{'met' if speedup >= 4 else 'MISSED'}); bare jax scan {seconds['jax_scan']:.2f}s, "
        f"agree={row['agree']}",
        flush=True,
    )
    return [row]


def main_job_seconds(steps: int, repeats: int) -> dict:
    """Wall time of ``python experiments/train.py`` as a user runs it (the process's start-up,
    imports, training, plots and files), with JAX's persistent compilation cache empty
    (``cold``) and filled by the run before (``warm``); medians of ``repeats`` pairs."""
    import subprocess
    import tempfile

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    times = {"cold": [], "warm": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            environment = {**os.environ, "XDG_CACHE_HOME": os.path.join(folder, "cache")}
            environment.pop("JAXSOFTMAX_NO_COMPILATION_CACHE", None)
            for kind, out in (("cold", "one"), ("warm", "two")):
                command = [sys.executable, script, "--steps", str(steps), "--out"]
                start = time.perf_counter()
                subprocess.run(
                    [*command, os.path.join(folder, out)],
                    env=environment,
                    check=True,
                    capture_output=True,
                )
                times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(values) for kind, values in times.items()}


# ----------------------------------------------------------------------------- output


def spread(quartiles) -> str:
    return f"{quartiles[0]:.2f}-{quartiles[1]:.2f}"


def write_markdown(path, meta, rows):
    memory = meta["memory"]
    tunables = f"`{memory['glibc_tunables']}`" if memory["glibc_tunables"] else "unset"
    lines = [
        f"# Benchmarks on {meta['device']}",
        "",
        f"Reproduce: `{meta['command']}`",
        "",
        f"jax {meta['jax']}, jaxlib {meta['jaxlib']}, optax {meta['optax']}, "
        f"torch {meta['torch']}, tokamax {meta.get('tokamax', 'not installed')}, "
        f"numpy {meta['numpy']}, Python {meta['python']}, "
        f"{meta['cpu_count']} CPU cores; transparent huge pages "
        f"`{memory['transparent_hugepages']}`, GLIBC_TUNABLES {tunables} (see "
        "docs/performance.md, *Fresh memory*). Times are medians of interleaved repeats "
        "(ms per call; one repeat of a fast call times as many calls as fill 20 ms); memory "
        "is the compiled program's temporary bytes.",
        "",
        "## 1. Loss + gradient, integer labels",
        "",
        "Fast shapes are timed over more rounds (up to four times as many, in about two "
        "seconds); in parentheses after the ratio to optax, the middle half (first to third "
        "quartile) of that ratio round by round, each round running the competitors back to "
        "back. A target is judged on the ratio of the medians.",
        "",
        "| dtype | N | C | jaxsoftmax ms | optax ms | naive ms | torch ms | vs optax "
        "(<= 1.0) | vs naive (<= 0.15) | temp MiB jaxsoftmax / optax / naive | agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = lambda b: f"{b / 2**20:.1f}"
    for r in (r for r in rows if r["case"] == 1):
        s, m = r["seconds"], r["temp_bytes"]
        lines.append(
            f"| {r['dtype']} | {r['n']} | {r['classes']} | {s['jaxsoftmax'] * 1e3:.2f} | "
            f"{s['optax'] * 1e3:.2f} | {s['naive'] * 1e3:.2f} | "
            f"{s['torch'] * 1e3:.2f} | "
            if "torch" in s
            else f"| {r['dtype']} | {r['n']} | {r['classes']} | {s['jaxsoftmax'] * 1e3:.2f} | "
            f"{s['optax'] * 1e3:.2f} | {s['naive'] * 1e3:.2f} | n/a | "
        )
        lines[-1] += (
            f"{r['ratio_vs_optax']:.2f} {'met' if r['meets_optax_target'] else '**missed**'}"
            f" ({spread(r['ratio_vs_optax_quartiles'])}) | {r['ratio_vs_naive']:.3f} "
            f"{'met' if r['meets_naive_target'] else '**missed**'} | "
            f"{mib(m['jaxsoftmax'])} / {mib(m['optax'])} / {mib(m['naive'])} | "
            f"{r['agree']} |"
        )
    plain_rows = [r for r in rows if r["case"] == 1 and "ratio_fast_vs_plain" in r]
    if plain_rows:
        lines += [
            "",
            "The CPU's fast paths (`jaxsoftmax/core/cpu_programs.py`) against the plain rule, the "
            "program a GPU or TPU compiles, both run on this CPU in the same rounds:",
            "",
        ]
        columns = "dtype,N,C,fast ms,plain ms,fast / plain,plain vs optax,temp MiB fast / plain"
        lines += harness.markdown_table(
            columns.split(","),
            [
                [
                    r["dtype"],
                    str(r["n"]),
                    str(r["classes"]),
                    f"{r['seconds']['jaxsoftmax'] * 1e3:.2f}",
                    f"{r['seconds']['plain'] * 1e3:.2f}",
                    f"{r['ratio_fast_vs_plain']:.2f}",
                    f"{r['ratio_plain_vs_optax']:.2f}",
                    f"{mib(r['temp_bytes']['jaxsoftmax'])} / {mib(r['temp_bytes']['plain'])}",
                ]
                for r in plain_rows
            ],
        )
    lines += [
        "",
        "## 2. linear_cross_entropy vs logits then optax and tokamax (loss + both gradients)",
        "",
        'Fused: `linear_cross_entropy` with its default `method="auto"` (the method it '
        'chose is shown); recompute: `method="recompute"`; plain rule: the fused loss compiled '
        "with the program a GPU or TPU gets (on the CPU only); [d,V]: the classifier as a "
        "`[d, V]` kernel, the layout tokamax takes; tokamax: "
        '`tokamax.linear_softmax_cross_entropy_loss(..., implementation="chunked_xla")`, '
        f"version {meta.get('tokamax', 'not installed')} (Python >= 3.12 only).",
        "",
        "| dtype | N | d | V | method | fused temp MiB | naive temp MiB | naive / fused | "
        "fused [d,V] MiB | naive [d,V] MiB | tokamax [d,V] MiB | target | "
        "fused, plain rule MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["case"] == 2 and r["kind"] == "memory"):
        m = r["temp_bytes"]
        target = "-"
        if "meets_memory_target" in r:
            met = lambda ok: "met" if ok else "**missed**"
            target = f">= {r.get('memory_target', 50)}x: {met(r['meets_memory_target'])}"
            if "meets_tokamax_memory_target" in r:
                target += f"; <= tokamax: {met(r['meets_tokamax_memory_target'])}"
        lines.append(
            f"| {r['dtype']} | {r['n']} | {r['d']} | {r['v']} | {r['method']} | "
            f"{mib(m['fused'])} | {mib(m['naive'])} | {r['memory_ratio']:.1f} | "
            f"{mib(m['fused_dv'])} | {mib(m['naive_dv'])} | "
            + (f"{mib(m['tokamax'])} | " if "tokamax" in m else "- | ")
            + f"{target} | "
            + (f"{mib(m['fused_plain'])} |" if "fused_plain" in m else "- |")
        )
    lines += [
        "",
        "Targets: `[V, d]` fused / naive <= 1.0, and `[d, V]` fused / the faster of naive and "
        "tokamax <= 1.0.",
        "",
        "| dtype | N | d | V | method | fused ms | recompute ms | naive ms | fused / naive | "
        "fused [d,V] ms | naive [d,V] ms | tokamax ms | [d,V] fused / best | target | agree | "
        "fused, plain rule ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ms = lambda s, k: f"{s[k] * 1e3:.1f}" if k in s else "-"
    for r in (r for r in rows if r["case"] == 2 and r["kind"] == "time"):
        s = r["seconds"]
        best = r.get("time_ratio_vs_best")
        lines.append(
            f"| {r['dtype']} | {r['n']} | {r['d']} | {r['v']} | {r['method']} | "
            f"{ms(s, 'fused')} | {ms(s, 'recompute')} | {ms(s, 'naive')} | "
            f"{r['time_ratio']:.2f} | {ms(s, 'fused_dv')} | {ms(s, 'naive_dv')} | "
            f"{ms(s, 'tokamax')} | {'-' if best is None else f'{best:.2f}'} | "
            f"{'met' if r['meets_time_target'] else '**missed**'} | {r['agree']}"
            + (f", tokamax {r['tokamax_agrees']}" if "tokamax_agrees" in r else "")
            + f" | {ms(s, 'fused_plain')} |"
        )
    lines += ["", "## 3. Spiral case study end to end (train_seconds, compilation included)", ""]
    for r in (r for r in rows if r["case"] == 3):
        s = r["train_seconds"]
        lines.append(f"{r['steps']} full-batch steps. JAX: {r['jax']}.")
        lines.append("")
        lines.append(
            "| numpy s | jaxsoftmax s | bare jax scan s | torch s | speed-up vs numpy (>= 4) "
            "| final loss numpy / jaxsoftmax / scan / torch | agree |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        losses = r.get("final_loss", {})
        lines.append(
            f"| {s['numpy']:.2f} | {s['jaxsoftmax']:.2f} | {s.get('jax_scan', float('nan')):.2f} | "
            f"{s.get('torch', float('nan')):.2f} | {r['speedup_vs_numpy']:.1f} "
            f"{'met' if r['meets_target'] else '**missed**'} | "
            + " / ".join(
                f"{losses[k]:.4f}" if k in losses else "-"
                for k in ("numpy", "jaxsoftmax", "jax_scan", "torch")
            )
            + f" | {r.get('agree', '-')} |"
        )
        if "main_job_seconds" in r:
            job = r["main_job_seconds"]
            lines += [
                "",
                f"`python experiments/train.py` as a user runs it (the whole process: start-up, "
                f"imports, training, plots and files): {job['cold']:.2f} s with JAX's "
                f"compilation cache empty, {job['warm']:.2f} s with it filled by a run before; "
                f"the NumPy loop of CS231n's case study, training alone in this process: "
                f"{s['numpy']:.2f} s.",
            ]
    case4 = [r for r in rows if r["case"] == 4]
    if case4:
        lines += ["", "## 4. gradient_filter on a trained language model's logits", ""]
    if case4 and case4[0]["kind"] == "missing":
        lines.append(f"Not run: {case4[0]['reason']}")
    elif case4:
        s = case4[0]["shape"]
        lines += [
            f"Loss + gradients, N = {s['n']} validation tokens, d = {s['d']}, V = {s['v']} "
            "(experiments/gradient_filter.py; the model experiments/language_model.py trained).",
            "",
            "| tile | eps | tiles skipped | time / exact | relative error dL/dh | "
            "relative error dL/dW |",
            "|---|---|---|---|---|---|",
        ]
        for r in case4:
            lines.append(
                f"| {r['tile']} | {r['eps']:g} | {r['skipped_tiles']:.1%} | "
                f"{r['time_ratio']:.2f} | {r['relative_error_hidden']:.2e} | "
                f"{r['relative_error_classifier']:.2e} |"
            )
    missed = [r for r in rows if any(k.startswith("meets") and v is False for k, v in r.items())]
    lines += ["", f"Targets missed: {len(missed)} row(s)." if missed else "", ""]
    training.write_atomically(path, "\n".join(lines))


def case_gradient_filter(repeats):
    """Case 4: ``gradient_filter`` on the trained language model's logits
    (``experiments/gradient_filter.py``), when ``experiments/language_model.py`` has left a
    checkpoint; else one row saying so."""
    import filter_measurement

    try:
        result = filter_measurement.measure(repeats=repeats)
    except FileNotFoundError as error:
        print(f"[4] skipped: {error}", flush=True)
        return [dict(case=4, kind="missing", reason=str(error))]
    rows = [dict(case=4, kind="filter", shape=result["shape"], **r) for r in result["rows"]]
    for r in rows:
        print(
            f"[4] gradient filter, tile {r['tile']}, eps {r['eps']:g}: time {r['time_ratio']:.2f} "
            f"of exact, relative error dh {r['relative_error_hidden']:.1e}",
            flush=True,
        )
    return rows


def write_chart(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    case1 = [r for r in rows if r["case"] == 1]
    labels = [f"{r['dtype'][:4]}\n{r['n']}x{r['classes']}" for r in case1]
    x = np.arange(len(case1))
    for i, (name, key) in enumerate(
        [
            ("vs optax", "ratio_vs_optax"),
            ("vs naive", "ratio_vs_naive"),
            ("vs torch", "ratio_vs_torch"),
        ]
    ):
        axes[0].bar(x + (i - 1) * 0.27, [r.get(key, np.nan) for r in case1], 0.27, label=name)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].axhline(0.15, color="r", lw=0.8, ls="--")
    axes[0].set_xticks(x, labels, fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_title("1. cross_entropy time / competitor (lower is better)")
    axes[0].legend(fontsize=8)
    mem = [r for r in rows if r["case"] == 2 and r["kind"] == "memory"]
    xm = np.arange(len(mem))
    axes[1].bar(xm - 0.2, [r["temp_bytes"]["naive"] / 2**20 for r in mem], 0.4, label="naive")
    axes[1].bar(xm + 0.2, [r["temp_bytes"]["fused"] / 2**20 for r in mem], 0.4, label="fused")
    axes[1].set_xticks(
        xm, [f"{r['dtype'][:4]}\n{r['n']},{r['d']},{r['v']}" for r in mem], fontsize=7
    )
    axes[1].set_yscale("log")
    axes[1].set_ylabel("temporary MiB")
    axes[1].set_title("2. linear cross-entropy, compiled temp memory")
    axes[1].legend(fontsize=8)
    spiral_rows = [r for r in rows if r["case"] == 3]
    if spiral_rows:
        s = spiral_rows[0]["train_seconds"]
        axes[2].bar(
            list(s),
            list(s.values()),
            color=["tab:gray", "tab:blue", "tab:cyan", "tab:orange"][: len(s)],
        )
        axes[2].set_ylabel("train_seconds")
        axes[2].set_title(f"3. spiral, {spiral_rows[0]['steps']} steps, end to end")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    training.write_atomically(path, buffer.getvalue())


def cases_to_run(args, device) -> tuple[int, list]:
    """``(repeats, cases)``: the rounds per case and the ``(name, run)`` cases of a run with
    ``args``' flags on ``device``: tiny shapes with ``--quick``; else the committed results'
    shapes, on an accelerator also as large as its memory allows."""
    if args.quick:
        repeats = args.repeats or 3
        return repeats, [
            ("1", lambda: case_integer_labels([(256, 1000)], [jnp.float32], repeats)),
            (
                "2",
                lambda: case_linear([(256, 64, 1000)], [(512, 64, 5000)], [jnp.float32], repeats),
            ),
            ("3", lambda: case_spiral(200, 1)),
        ]
    repeats = args.repeats or 8  # two whole Williams squares of case 1's four competitors
    shapes = [(128, 10), (1024, 1000), (4096, 4096), (4096, 32768), (8192, 32768)]
    shapes += [(8192, 65536)] if args.large else []
    memory_shapes = [GEMMA, (2048, 512, 32768)]
    timed = [(2048, 512, 32768)]
    if device.platform != "cpu":  # on an accelerator, also as large as its memory allows
        shapes += naive_fits(device, [(8192, 65536), (16384, 131072), (32768, 131072)])
        shapes = list(dict.fromkeys(shapes))  # --large's shape once
        largest = largest_naive_fit(device, GEMMA[1], GEMMA[2], jnp.float32)
        timed += [largest] if largest is not None else []
    dtypes = [jnp.float32, jnp.bfloat16]
    cases = [
        (f"1 {jnp.dtype(dtype).name}", lambda d=dtype: case_integer_labels(shapes, [d], repeats))
        for dtype in dtypes
    ]
    return repeats, [
        *cases,
        ("2", lambda: case_linear(timed, memory_shapes, dtypes, repeats)),
        ("3", lambda: case_spiral(10_000, 4)),  # one Williams square
        ("4", lambda: case_gradient_filter(repeats)),
    ]


def run_description(args, argv, device) -> dict:
    """The ``meta`` of results.json: the device, the command, the versions, the machine and
    how it gets fresh memory."""
    memory = memory_setting()
    return dict(
        device=harness.device_model(device),
        command=harness.command(
            "benchmark.py",
            argv,
            (f"GLIBC_TUNABLES={memory['glibc_tunables']}",) if memory["glibc_tunables"] else (),
        ),
        jax=jax.__version__,
        jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
        optax=optax.__version__,
        jaxsoftmax=jaxsoftmax.__version__,
        torch=torch.__version__ if torch is not None else "not installed",
        tokamax=tokamax_version(),
        numpy=np.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        machine=platform.platform(),
        memory=memory,
        quick=args.quick,
    )


def main(argv=None):
    parser = harness.benchmark_parser(
        __doc__,
        out=f"output folder; None: benchmarks/results/<device>, or {QUICK_OUT} with --quick "
        "(a smoke run never replaces the committed results)",
        repeats="timed rounds per case (fast cases get up to four times as many); None: 8, "
        "or 3 with --quick",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="add case 1 at (8192, 65536): more than the 24 GiB of the 2-core CPU machine "
        "holds (the competitors' logits-sized arrays; the process was killed there)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated cases to run (1, 2, 3, 4); None: all",
    )
    args = parser.parse_args(argv)
    chosen = None if args.cases is None else set(args.cases.replace(" ", "").split(","))
    if chosen is not None and not chosen <= {"1", "2", "3", "4"}:
        parser.error(f"argument --cases: expected numbers among 1, 2, 3, 4; got {args.cases!r}")
    device = jax.devices()[0]
    out = harness.output_folder(args, QUICK_OUT, device.platform)
    repeats, cases = cases_to_run(args, device)
    if chosen is not None:
        cases = [(name, run) for name, run in cases if name.split()[0] in chosen]
    settings = dict(
        quick=args.quick, large=args.large, repeats=repeats, device=str(device), cases=args.cases
    )
    rows = run_cases(out, settings, cases, fresh=args.fresh)
    meta = run_description(args, argv, device)
    write_chart(os.path.join(out, "chart.png"), rows)
    harness.write_results(out, meta, rows, write_markdown)
    print(f"wrote {out}/results.json, results.md, chart.png")
    return rows


if __name__ == "__main__":
    main()
