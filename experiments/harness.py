"""The measuring harness of the benchmarks in ``experiments/``: interleaved timing rounds, the
compiled programs' memory, how the process gets fresh memory, and resuming an interrupted run.

Timing: one warm-up call per competitor (it compiles), then rounds in which the competitors run
one after the other, each round in another order (a Williams design, :func:`round_orders`), each
call ended by ``block_until_ready``; a call faster than 20 ms is timed as many times as fill
20 ms, and fast calls get more rounds (:func:`rounds_for`). The median over the rounds is the
figure (:func:`medians`), the quartiles of the per-round ratio its spread
(:func:`ratio_quartiles`). Memory is the compiled program's ``memory_analysis()``: nothing runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

import jax
import numpy as np

from jaxsoftmax import training

PARTIAL_RESULTS = ".partial.json"  # the finished cases of an interrupted run
HUGEPAGE_MODES = "/sys/kernel/mm/transparent_hugepage/enabled"


def memory_setting(modes_file: str = HUGEPAGE_MODES) -> dict:
    """How this process gets fresh memory, which sets the time of every large output on a CPU.

    A new array of 64 MiB faults in 16,384 pages of 4 KiB on first touch, which takes most of a
    loss-plus-gradient call at ``(4096, 4096)``; with transparent huge pages (2 MiB) it takes
    a few hundred faults (``docs/performance.md``, *Fresh memory*). Linux's mode is the
    bracketed word of ``modes_file`` (``always``, ``madvise`` or ``never``; ``"unknown"``
    without the file); under ``madvise``, glibc asks for huge pages only when started with
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, recorded as set in the environment.
    """
    try:
        with open(modes_file) as file:
            mode = re.search(r"\[(\w+)\]", file.read())
    except OSError:
        mode = None
    return dict(
        transparent_hugepages=mode[1] if mode else "unknown",
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
    )


def device_model(device) -> str:
    """``"platform: kind"`` of ``device``, and on a CPU the processor's model and its
    instruction sets that change the speed of narrow floats (``AMX-BF16``, ``AVX512-BF16``):
    a CPU's timings are of that processor."""
    described = f"{device.platform}: {device.device_kind}"
    if device.platform != "cpu":
        return described
    try:
        with open("/proc/cpuinfo") as info:
            text = info.read()
    except OSError:
        return described
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.+)$", text, re.M) or ["", ""])[1].split())
    narrow = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
              if flag in flags]  # fmt: skip
    extra = [model.group(1).strip()] if model else []
    extra += [f"with {', '.join(narrow)}" if narrow else "no bf16 instructions"]
    return f"{described} ({'; '.join(extra)})"


def block(x):
    """Waits until ``x`` is computed: JAX arrays by ``block_until_ready``, a PyTorch result (a
    tuple of tensors) on a GPU by synchronising, since PyTorch's GPU calls return before they
    finish, like JAX's."""
    if isinstance(x, (tuple, list)) and x and type(x[0]).__module__.startswith("torch"):
        if x[0].is_cuda:
            import torch

            torch.cuda.synchronize()
        return x
    return jax.block_until_ready(x)


def round_orders(names: list, repeats: int) -> list[list]:
    """``repeats`` orders of ``names``, one per round, from a Williams design: over ``n`` rounds
    (``2 n`` for an odd ``n``) every competitor runs right after every other one equally often.

    Rotating one order would keep its cycle: whoever follows PyTorch in the first round would
    follow it in almost every round, and inherit its spinning threads each time."""
    n = len(names)
    first, low, high = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...: every difference mod n once
    while len(first) < n:
        if len(first) % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    rows = [[(k + shift) % n for k in first] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [[names[k] for k in rows[r % len(rows)]] for r in range(repeats)]


def rounds_for(repeats: int, seconds_per_round: float, competitors: int, budget: float = 2.0):
    """How many rounds to time: ``repeats``, or for fast calls up to four times as many, enough
    to fill ``budget`` seconds, in whole Williams squares (:func:`round_orders`).

    A millisecond call is at the mercy of whatever else the shared machine does in that
    millisecond: its median over eight rounds moved by +-20% between runs at (1024, 1000).
    More rounds cost a fast case little and narrow its median."""
    wanted = min(4 * repeats, math.ceil(budget / max(seconds_per_round, 1e-9)))
    if wanted <= repeats:
        return repeats
    square = competitors if competitors % 2 == 0 else 2 * competitors
    return math.ceil(wanted / square) * square


def time_rounds(callables: dict, repeats: int, min_sample_seconds: float = 0.02) -> list[dict]:
    """Seconds per call of each competitor in each round (a list of ``{name: seconds}``).

    One warm-up call each (it compiles), then a second timed call picks how many calls make
    one sample: enough to last ``min_sample_seconds``, so that a 50-microsecond call is not
    timed alone, where the clock and the scheduler's noise are as large as the call; every call
    is still ended by ``block_until_ready``. A sample's time is divided by its call count.
    There are :func:`rounds_for` rounds: ``repeats``, more for fast calls.

    Each round runs the competitors in another order (:func:`round_orders`), so no
    competitor always runs right after the same other one, whose lingering threads
    (PyTorch's OpenMP workers spin for a while after each call) or cache state it would
    inherit; the median then drops the rounds that did. (Making OpenMP wait passively instead
    slowed PyTorch's small eager steps sevenfold.)
    """
    calls_per_sample, sample_seconds = {}, 0.0
    for name, fn in callables.items():
        block(fn())
        start = time.perf_counter()
        block(fn())
        once = time.perf_counter() - start
        calls_per_sample[name] = max(1, min(1000, round(min_sample_seconds / max(once, 1e-7))))
        sample_seconds += once * calls_per_sample[name]
    rounds = []
    for order in round_orders(list(callables), rounds_for(repeats, sample_seconds, len(callables))):
        this_round = {}
        for name in order:
            fn, calls = callables[name], calls_per_sample[name]
            start = time.perf_counter()
            for _ in range(calls):
                block(fn())
            this_round[name] = (time.perf_counter() - start) / calls
        rounds.append(this_round)
    return rounds


def medians(rounds: list[dict]) -> dict:
    """Each competitor's median over ``rounds`` (from :func:`time_rounds`)."""
    return {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}


def ratio_quartiles(rounds: list[dict], numerator: str, denominator: str) -> list[float]:
    """The first and third quartiles of ``numerator / denominator`` round by round.

    The two ran back to back in each round, so the per-round ratio is free of the drift
    between rounds, though not of what ran just before each (which the medians drop); the
    middle half of those ratios shows how far the machine's noise moves a ratio that the
    medians put near a target."""
    ratios = [r[numerator] / r[denominator] for r in rounds]
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return [first, third]


def time_interleaved(callables: dict, repeats: int, min_sample_seconds: float = 0.02) -> dict:
    """Median seconds per call of each competitor over :func:`time_rounds`' rounds."""
    return medians(time_rounds(callables, repeats, min_sample_seconds))


def agree(results: dict, dtype) -> bool:
    """Every competitor's value and gradients equal the first's, within the dtype's error."""
    tolerance = 2e-2 if dtype == jax.numpy.bfloat16 else 2e-4
    first = jax.tree.leaves(next(iter(results.values())))
    for result in results.values():
        for a, b in zip(jax.tree.leaves(result), first):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            if not np.allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max()):
                return False
    return True


def compiled_memory(fn, *args):
    """``memory_analysis()`` of ``jit(fn)`` compiled for ``args`` (arrays or shapes); nothing runs."""
    return jax.jit(fn).lower(*args).compile().memory_analysis()


def temp_bytes(fn, *args) -> int:
    return int(compiled_memory(fn, *args).temp_size_in_bytes)


def run_cases(out: str, settings: dict, cases: list, fresh: bool = False) -> list[dict]:
    """Runs ``cases`` (``(name, run)`` pairs, ``run()`` returning rows) and returns all rows.

    After each case its rows are saved to ``out/.partial.json`` (atomically, with ``settings``),
    so an interrupted benchmark, run again with the same settings, takes the finished cases from
    there and runs only the rest; ``fresh`` discards them. Each case still times its
    competitors side by side in one process. The caller deletes the file once the results are
    written.
    """
    path = os.path.join(out, PARTIAL_RESULTS)
    finished = {}
    if os.path.exists(path) and not fresh:
        with open(path) as file:
            saved = json.load(file)
        if saved["settings"] == settings:
            finished = saved["cases"]
    for name, run in cases:
        if name in finished:
            print(f"[{name}] taken from {path}, saved by an interrupted run", flush=True)
            continue
        # a JSON round trip, so that rows run now and rows resumed later are alike
        finished[name] = json.loads(json.dumps(run(), default=float))
        training.write_atomically(path, json.dumps(dict(settings=settings, cases=finished)))
    return [row for name, _ in cases for row in finished[name]]


def add_run_flags(parser: argparse.ArgumentParser, out: str, repeats: str | None) -> None:
    """The flags every benchmark takes: ``--quick``, ``--out`` (``out``: its help),
    ``--repeats`` (``repeats``: its help; None for a benchmark that times nothing) and
    ``--fresh``."""
    from common import positive_int

    parser.add_argument("--quick", action="store_true", help="tiny shapes, a smoke run")
    parser.add_argument("--out", default=None, help=out)
    if repeats is not None:
        parser.add_argument("--repeats", type=positive_int, default=None, help=repeats)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help=f"discard the finished cases an interrupted run saved in {PARTIAL_RESULTS}",
    )


def benchmark_parser(doc: str, out: str, repeats: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: the first line of its docstring ``doc``, every default shown, and
    the flags of :func:`add_run_flags`."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_run_flags(parser, out=out, repeats=repeats)
    return parser


def output_folder(args: argparse.Namespace, quick_out: str, *committed: str) -> str:
    """Creates and returns where a benchmark writes: ``--out``; else with ``--quick``
    ``quick_out`` (a smoke run never replaces the committed results); else the committed
    results' folder, ``benchmarks/results/<committed...>`` of this repository."""
    results = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results"
    )
    out = args.out or (quick_out if args.quick else os.path.join(results, *committed))
    os.makedirs(out, exist_ok=True)
    return out


def command(script: str, argv: list[str] | None, prefix: tuple[str, ...] = ()) -> str:
    """The command line that ran ``experiments/<script>`` with ``argv`` (None: this process's
    arguments), after the environment settings of ``prefix``."""
    return " ".join(
        [*prefix, "python", f"experiments/{script}", *(argv if argv is not None else sys.argv[1:])]
    )


def write_results(out: str, meta: dict, rows: list[dict], write_markdown) -> None:
    """``results.json`` (``meta`` and ``rows``) and ``results.md`` (``write_markdown(path, meta,
    rows)``) in ``out``, atomically; then the partial results of :func:`run_cases` go."""
    training.write_atomically(
        os.path.join(out, "results.json"), json.dumps(dict(meta=meta, rows=rows), indent=1)
    )
    write_markdown(os.path.join(out, "results.md"), meta, rows)
    os.remove(os.path.join(out, PARTIAL_RESULTS))


def markdown_table(columns: list[str], rows: list[list[str]], rule: str = "---") -> list[str]:
    """The lines of a Markdown table: the header of ``columns``, the rule (``"---"``, or for
    example ``" ---: "`` for right-aligned columns), one line per row of cells."""
    line = lambda cells: "| " + " | ".join(cells) + " |"
    return [line(columns), "|" + "|".join([rule] * len(columns)) + "|", *map(line, rows)]
