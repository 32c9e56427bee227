"""JAX's persistent compilation cache for the scripts in ``experiments/``: compile once, run
again fast.

The scripts' programs are small: compiling them takes longer than running them (about 1.2 s
of ``python experiments/train.py``'s time is compilation). With the cache on, a second run of
the same program loads the compiled executable from disk instead. One folder serves every
run, whatever its ``--out``: ``$XDG_CACHE_HOME/jaxsoftmax/jax-compilation-cache`` (by default
``~/.cache/jaxsoftmax/jax-compilation-cache``). JAX caches only programs that took at least a
second to compile unless told otherwise; these settings cache every program.

Turn it off with a script's ``--no-compilation-cache`` flag, or for every script with the
environment variable ``JAXSOFTMAX_NO_COMPILATION_CACHE=1``.
"""

from __future__ import annotations

import argparse
import os

import jax

DISABLE_VARIABLE = "JAXSOFTMAX_NO_COMPILATION_CACHE"


def default_directory() -> str:
    """The cache folder: ``$XDG_CACHE_HOME/jaxsoftmax/jax-compilation-cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxsoftmax", "jax-compilation-cache")


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help=f"compile every program afresh, without JAX's persistent cache in "
        f"{default_directory()} (also: {DISABLE_VARIABLE}=1)",
    )


def enable(arguments: argparse.Namespace) -> str | None:
    """Turns the cache on unless the flag or the variable turns it off; returns its folder,
    or None when off. Call it before JAX compiles anything."""
    if arguments.no_compilation_cache or os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return None
    directory = default_directory()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
