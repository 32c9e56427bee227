"""What the scripts in ``experiments/`` share: flag types, JAX's compilation cache, checks of
the output folder, and the files and figures a run writes.

Flag types parse a flag's text and check its range; a value outside it raises
``argparse.ArgumentTypeError``, which argparse turns into one line naming the flag and exit
status 2, before the script does any work. This module imports no JAX at import time, so a
script can parse its flags (and set ``XLA_FLAGS``) before JAX starts.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import sys
from collections.abc import Callable
from typing import Any


def number(kind, test, expected: str):
    """An argparse type: ``kind(text)`` passing ``test``, else "expected <expected>; got ..."."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value

    return parse


positive_int = number(int, lambda v: v > 0, "a positive integer")
non_negative_int = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
non_negative_float = number(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
coefficient_below_one = number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
fraction = number(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def positive_counts(what: str, example: str):
    """An argparse type: comma-separated positive counts (``"10,100"`` -> ``[10, 100]``)."""

    def parse(text: str) -> list[int]:
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            counts = []
        if not counts or any(count <= 0 for count in counts):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive {what} such as {example}; got {text!r}"
            )
        return counts

    return parse


def comma_separated_choices(choices):
    """An argparse type: a comma-separated list of ``choices`` (``"vd,dv"`` -> ``["vd", "dv"]``)."""

    def parse(text: str) -> list[str]:
        parts = text.split(",")
        if not all(part in choices for part in parts):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}; got {text!r}"
            )
        return parts

    return parse


def writable_file(text: str) -> str:
    """A file path whose folder exists (the scripts' ``--json``), checked before any work."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text) or not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(
            f"expected a file path in an existing directory; got {text!r}"
        )
    return text


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a usage error as one line, ``train.py: error: argument --lr: ... (see --help)``,
    with exit status 2 and no traceback; the many-line usage would hide it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def script_parser(doc: str) -> OneLineErrorParser:
    """The parser of a script whose docstring is ``doc``: its first paragraph as the
    description, every flag's default in ``--help``, usage errors in one line."""
    return OneLineErrorParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


# ---------------------------------------------------------------------------------------------
# Flags
#
# A script's flags that set a field of its configuration (``TrainConfig``, ``LMConfig``...) are
# rows ``(field, kind, help)``: the flag is the field's name with dashes (``--lr`` for
# ``learning_rate``), its default the configuration's, and ``kind`` an argparse type or a tuple
# of choices. The same rows turn the parsed flags back into the configuration's fields.

RENAMED_FLAGS = {"learning_rate": "--lr"}
# The flags that several scripts take, with the same meaning: ``field: (kind, help)``.
SHARED_FLAGS = {
    "learning_rate": (
        positive_float,
        "peak learning rate of AdamW, reached after --warmup-steps, cosine decay after",
    ),
    "warmup_steps": (non_negative_int, "steps of linear warm-up"),
    "z_loss": (non_negative_float, "weight of the z-loss, >= 0"),
    "steps": (positive_int, "optimizer steps"),
    "seed": (int, "seed of the random numbers: data, initialisation, order of the batches"),
    "eval_every": (positive_int, "steps between evaluations, one history row each"),
    "checkpoint_every": (
        non_negative_int,
        "steps between checkpoints, a multiple of --eval-every; 0: none",
    ),
    "devices": (
        positive_int,
        "run data-parallel on the first N local devices (of each process), the batch split "
        "over them; None: all",
    ),
}


def flag_of(field: str) -> str:
    """The flag that sets ``field``: ``"eval_every"`` -> ``"--eval-every"``."""
    return RENAMED_FLAGS.get(field, "--" + field.replace("_", "-"))


def add_field_flags(parser: argparse.ArgumentParser, defaults: Any, rows) -> None:
    """One flag per row, its default ``defaults``' field (a dataclass or a dict): a row is
    ``(field, kind, help)``, or the name of a field of :data:`SHARED_FLAGS`."""
    for row in rows:
        field, kind, help_text = (row, *SHARED_FLAGS[row]) if isinstance(row, str) else row
        default = defaults[field] if isinstance(defaults, dict) else getattr(defaults, field)
        how = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        parser.add_argument(flag_of(field), default=default, help=help_text, **how)


def fields_of(arguments: argparse.Namespace, rows) -> dict[str, Any]:
    """``{field: value}`` of the parsed flags of ``rows`` (see :func:`add_field_flags`)."""
    fields = [row if isinstance(row, str) else row[0] for row in rows]
    return {field: getattr(arguments, flag_of(field)[2:].replace("-", "_")) for field in fields}


def add_output_flags(parser: argparse.ArgumentParser, out: str, out_help: str, plots: str):
    """The flags of a training script's outputs: ``--out`` (default ``out``), ``--resume``,
    ``--no-plots`` (which skips ``plots``), ``--no-progress`` and ``--no-compilation-cache``."""
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    parser.add_argument("--no-plots", action="store_true", help=f"skip {plots}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cache_flag(parser)


# ---------------------------------------------------------------------------------------------
# JAX's persistent compilation cache
#
# The scripts' programs are small: compiling them takes longer than running them (about 1.2 s
# of ``python experiments/train.py``'s time is compilation). With the cache on, a second run of
# the same program loads the compiled executable from disk instead. One folder serves every
# run, whatever its ``--out``: ``$XDG_CACHE_HOME/jaxsoftmax/jax-compilation-cache`` (by default
# ``~/.cache/jaxsoftmax/jax-compilation-cache``). JAX caches only programs that took at least a
# second to compile unless told otherwise; these settings cache every program. A script's
# ``--no-compilation-cache`` flag turns it off, and for every script (the test suite sets it)
# the environment variable ``JAXSOFTMAX_NO_COMPILATION_CACHE=1``.

DISABLE_CACHE_VARIABLE = "JAXSOFTMAX_NO_COMPILATION_CACHE"


def cache_directory() -> str:
    """The cache folder: ``$XDG_CACHE_HOME/jaxsoftmax/jax-compilation-cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxsoftmax", "jax-compilation-cache")


def add_cache_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-compilation-cache``."""
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help=f"compile every program afresh, without JAX's persistent cache in "
        f"{cache_directory()} (also: {DISABLE_CACHE_VARIABLE}=1)",
    )


def cache_disabled(arguments: argparse.Namespace | None = None) -> bool:
    """Whether the flag of ``arguments`` or the environment variable turns the cache off."""
    flag = arguments is not None and arguments.no_compilation_cache
    return flag or os.environ.get(DISABLE_CACHE_VARIABLE, "") not in ("", "0")


def enable_compilation_cache(arguments: argparse.Namespace) -> str | None:
    """Turns the cache on unless the flag or the variable turns it off; returns its folder,
    or None when off. Call it before JAX compiles anything."""
    if cache_disabled(arguments):
        return None
    import jax

    directory = cache_directory()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


# ---------------------------------------------------------------------------------------------
# Checks of a script's settings, reported as usage errors


def name_the_flag(message: str, arguments: argparse.Namespace) -> str:
    """A library error about a setting, prefixed as argparse does with the flag that sets it:
    ``"eval_every=30 must ..."`` -> ``"argument --eval-every: eval_every=30 must ..."``. The
    setting is the first one the message names; a message naming a flag already is kept."""
    if "--" in message:
        return message
    flags = {name: "--" + name.replace("_", "-") for name in vars(arguments)} | RENAMED_FLAGS
    names = "|".join(sorted(flags, key=len, reverse=True))
    first = re.search(rf"(?<![\w-])({names})(?![\w-])", message)
    return message if first is None else f"argument {flags[first.group(1)]}: {message}"


def output_directory_problem(out: str) -> str | None:
    """Why ``--out`` cannot be the output directory (a file, or under one, or not writable),
    or ``None`` if it can."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"{out!r} is an existing file; expected a directory (existing or to create)"
    ancestor = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{out!r} lies under the file {ancestor!r}; expected a directory path"
    existing = out if os.path.isdir(out) else ancestor
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{out!r}: {existing!r} is not writable; expected a directory this user can write"
    return None


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``argv``'s flags (None: the command line's), with JAX's compilation cache turned on
    unless they turn it off (:func:`enable_compilation_cache`)."""
    arguments = parser.parse_args(argv)
    enable_compilation_cache(arguments)
    return arguments


def check_output_directory(parser: argparse.ArgumentParser, out: str) -> None:
    """A usage error naming ``--out`` when ``out`` cannot be the output directory."""
    problem = output_directory_problem(out)
    if problem is not None:
        parser.error(f"argument --out: {problem}")


def checkpoint_to_resume(
    parser: argparse.ArgumentParser, arguments: argparse.Namespace, check: Callable[[str], int]
) -> tuple[str, int | None]:
    """The checkpoint's path in ``--out`` and, with ``--resume`` where one exists, its step, or
    a usage error naming ``--resume`` when ``check(path)`` (returning the step) finds that it
    cannot be resumed (another configuration, other data, more steps than asked for)."""
    from jaxsoftmax.training import CHECKPOINT_FILENAME

    path = os.path.join(arguments.out, CHECKPOINT_FILENAME)
    if not (arguments.resume and os.path.exists(path)):
        return path, None
    try:
        return path, check(path)
    except (ValueError, OSError, KeyError) as error:
        parser.error(f"argument --resume: {error}")


# ---------------------------------------------------------------------------------------------
# What a run writes and prints


def write_atomically(path: str, payload: bytes | str) -> None:
    """:func:`jaxsoftmax.training.write_atomically`, imported when first used (it starts JAX)."""
    from jaxsoftmax.training import write_atomically as write

    write(path, payload)


def prepare_output(out: str, names: tuple[str, ...]) -> None:
    """Creates ``out`` and removes the temporaries of ``names`` that a run killed while it
    wrote them left there."""
    from jaxsoftmax.training import remove_stale_temporaries

    os.makedirs(out, exist_ok=True)
    for name in names:
        remove_stale_temporaries(os.path.join(out, name))


def start_output(
    arguments: argparse.Namespace, names: tuple[str, ...], checkpoint: tuple[str, int | None]
) -> None:
    """With ``--resume``, says where the run resumes (``checkpoint``: the path and step of
    :func:`checkpoint_to_resume`); then :func:`prepare_output` of ``--out``."""
    if arguments.resume:
        print(resume_note(checkpoint[1], checkpoint[0]))
    prepare_output(arguments.out, names)


def resume_note(resuming_from: int | None, checkpoint_path: str) -> str:
    """The line a script prints for ``--resume``."""
    if resuming_from is None:
        return f"--resume: no checkpoint at {checkpoint_path}; starting from scratch"
    return f"resuming from step {resuming_from} of {checkpoint_path}"


def progress_bar(total: int, initial: int = 0, *, disabled: bool = False, **options):
    """A ``tqdm`` bar on stdout, or ``None`` when ``disabled`` (``--no-progress``)."""
    if disabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stdout, **options)


def train_with_progress(
    train: Callable[..., Any],
    arguments: argparse.Namespace,
    steps: int,
    postfix: Callable[[dict], dict],
    *,
    initial: int = 0,
    **options: Any,
) -> Any:
    """``train(checkpoint_dir=arguments.out, resume=arguments.resume, on_run_end=...)`` with a
    progress bar (:func:`progress_bar`, none with ``--no-progress``) that ``on_run_end``
    advances after each run, showing ``postfix(row)``; returns what ``train`` returns, or
    ``None`` when it stopped with a ``NonFiniteLossError``, after printing why."""
    from jaxsoftmax.training import NonFiniteLossError

    bar = progress_bar(steps, initial, disabled=arguments.no_progress, **options)

    def on_run_end(row: dict, steps_in_run: int) -> None:
        if bar is not None:
            bar.update(steps_in_run)
            bar.set_postfix(**postfix(row), refresh=False)

    try:
        return train(checkpoint_dir=arguments.out, resume=arguments.resume, on_run_end=on_run_end)
    except NonFiniteLossError as error:
        print(f"\nstopped: {error}", file=sys.stderr)
        return None
    finally:
        if bar is not None:
            bar.close()


def device_description() -> str:
    """The first device, as ``"cpu: cpu"``."""
    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {device.device_kind}"


def parameter_count(params: Any) -> int:
    """The number of values in the arrays of ``params``."""
    import jax

    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def steps_ran(steps: int, resumed_from: int | None) -> str:
    """The steps a run took: ``"500 steps"``, or when resumed ``"300 steps this run, resumed
    from step 200 (now at step 500),"``."""
    if resumed_from is None:
        return f"{steps} steps"
    return (
        f"{steps - resumed_from} steps this run, resumed from step {resumed_from} "
        f"(now at step {steps}),"
    )


def seconds_note(what: str, resumed_from: int | None) -> str:
    """``what`` the ``train_seconds`` of metrics.json measure, and where a resumed run began."""
    return what + (f"; resumed from step {resumed_from}" if resumed_from is not None else "")


def report_written(out: str, names: list[str]) -> None:
    """The line that ends a run: ``wrote OUT/metrics.json, ...``."""
    print(f"wrote {out}/" + ", ".join(names))


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of Python, the libraries and ``extra`` packages; for jaxsoftmax run
    from a source tree, its ``__version__``."""
    import jaxsoftmax

    versions = {"python": platform.python_version()}
    for name in ("jaxsoftmax", "jax", "jaxlib", "optax", "numpy", *extra):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = jaxsoftmax.__version__ if name == "jaxsoftmax" else "not installed"
    return versions


def write_history(path: str, history: list[dict]) -> None:
    """The history rows as CSV, written atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_atomically(path, text.getvalue())


def write_json(path: str, value: Any) -> None:
    """``value`` as indented JSON, written atomically."""
    write_atomically(path, json.dumps(value, indent=2))


def save_figure(figure, path: str) -> None:
    """A matplotlib figure as a PNG at ``path``, written atomically (rendered in memory first)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomically(path, buffer.getvalue())


def plot_lines(axes, x, lines: dict, references=(), **settings) -> None:
    """On ``axes``: each of ``lines`` (``{label: values}``) against ``x``, each reference
    ``(label, value, style)`` as a grey horizontal line, ``axes.set(**settings)``, a legend."""
    for label, values in lines.items():
        axes.plot(x, values, label=label)
    for label, value, style in references:
        axes.axhline(value, color="grey", linestyle=style, label=label)
    axes.set(**settings)
    axes.legend()


def write_figure(figure, path: str) -> None:
    """Lays ``figure`` out, writes it as a PNG (:func:`save_figure`) and closes it."""
    figure.tight_layout()
    save_figure(figure, path)
    pyplot().close(figure)


def pyplot():
    """``matplotlib.pyplot`` drawing off screen (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
