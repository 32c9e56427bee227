"""Argument types for the scripts in ``experiments/``: a bad number is a usage error.

Each type parses a flag's text and checks its range; a value outside it raises
``argparse.ArgumentTypeError``, which argparse turns into one line naming the flag and exit
status 2, before the script does any work.
"""

from __future__ import annotations

import argparse
import math
import os


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
