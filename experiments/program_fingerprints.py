"""Fingerprints of the compiled programs of every public loss, to compare two versions.

A refactor that must not change what runs (the package in layers, say) is checked here
rather than by timing on a shared machine: for 23 calls of the public losses (options,
companions, both layouts, every method, bf16, the three divergences, the sharded losses on
a (2, 4) mesh of 8 CPU devices) it compiles ``jit(value_and_grad(loss))`` for this CPU and
exports it for ``"cuda"``, strips what names the Python source (metadata, stack frames,
function and value names), and writes one text file per program and a ``summary.json`` of
their hashes. Two folders written by two versions compare equal exactly when every
program is the same::

    python experiments/program_fingerprints.py --out runs/programs/after
    git worktree add /tmp/before e627968
    PYTHONPATH=/tmp/before python experiments/program_fingerprints.py --out runs/programs/before
    python experiments/program_fingerprints.py --compare runs/programs/before runs/programs/after
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse
import hashlib
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxsoftmax as js


def canonical_hlo(text: str) -> str:
    """Optimized HLO without source locations, with values and computations renumbered."""
    kept = [
        line
        for line in text.splitlines()
        if not re.match(r"^\s*\d+ (\"|\{)", line)
        and not re.match(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\b", line)
    ]
    text = "\n".join(kept)
    text = re.sub(r",?\s*(metadata|frontend_attributes)=\{[^}]*\}", "", text)
    text = re.sub(r",?\s*stack_frame_id=\d+", "", text)
    text = re.sub(r"HloModule [^\s,]+", "HloModule M", text)
    return renumbered(text, r"%([\w.\-]+)", "%n")


def canonical_mlir(text: str) -> str:
    """Exported StableHLO without locations, with functions renumbered."""
    text = re.sub(r"\s*loc\([^()]*(\([^()]*\))*[^()]*\)", "", text)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))
    return renumbered(re.sub(r"module @\S+", "module @M", text), r"@([\w.\-]+)", "@f")


def renumbered(text: str, pattern: str, prefix: str) -> str:
    names = {}
    return re.sub(pattern, lambda m: prefix + str(names.setdefault(m.group(1), len(names))), text)


def cases() -> dict:
    """``name -> (loss, arguments)``: the calls whose programs are fingerprinted."""
    rng = np.random.default_rng(0)
    n, v, d = 16, 64, 8
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    z, zt, h, w, ht, wt = (
        normal(n, v),
        normal(n, v),
        normal(n, d),
        normal(v, d),
        normal(n, 2 * d),
        normal(v, 2 * d),
    )
    y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    mask, cw = jnp.arange(v) < v - 3, jnp.asarray(rng.uniform(size=v), jnp.float32)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    soft = jax.nn.softmax(zt)
    bf16 = lambda x: x.astype(jnp.bfloat16)
    aux = lambda out: out[0] + out[1].entropy.sum() + out[1].lse.sum()
    on_mesh = dict(mesh=mesh, class_axis_name="model", batch_axis_name="data")
    return {
        "ce": (lambda z: js.cross_entropy(z, y), (z,)),
        "ce_opts": (lambda z: js.cross_entropy(z, y, label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0, class_weights=cw, ignore_index=3, reduction="sum"), (z,)),
        "ce_aux": (lambda z: aux(js.cross_entropy(z, y, return_aux=True, vocab_mask=mask)), (z,)),
        "ce_soft": (lambda z: js.cross_entropy(z, soft), (z,)),
        "ce_bf16": (lambda z: js.cross_entropy(z, y).astype(jnp.float32), (bf16(z),)),
        "optax_int": (lambda z: js.softmax_cross_entropy_with_integer_labels(z, y).sum(), (z,)),
        "optax_soft": (lambda z: js.softmax_cross_entropy(z, soft).sum(), (z,)),
        "lce": (lambda h, w: js.linear_cross_entropy(h, w, y), (h, w)),
        "lce_chunks": (lambda h, w: js.linear_cross_entropy(h, w, y, token_chunk=8, vocab_chunk=16, z_loss=1e-4, label_smoothing=0.1), (h, w)),
        "lce_dv_aux": (lambda h, w: aux(js.linear_cross_entropy(h, w.T, y, classifier_layout="dv", return_aux=True, vocab_mask=mask, vocab_chunk=16)), (h, w)),
        "lce_fwd": (lambda h, w: js.linear_cross_entropy(h, w, y, method="forward"), (h, w)),
        "lce_recompute": (lambda h, w: js.linear_cross_entropy(h, w, y, method="recompute", vocab_chunk=16), (h, w)),
        "lce_filter": (lambda h, w: js.linear_cross_entropy(h, w, y, gradient_filter="auto", vocab_chunk=16, method="recompute"), (h, w)),
        "lce_bf16": (lambda h, w: js.linear_cross_entropy(h, w, y, vocab_chunk=16).astype(jnp.float32), (bf16(h), bf16(w))),
        "dist_fkl": (lambda z, t: js.distillation_loss(z, t, labels=y, hard_weight=0.5, temperature=2.0), (z, zt)),
        "dist_rkl": (lambda z, t: js.distillation_loss(z, t, divergence="reverse_kl"), (z, zt)),
        "dist_jsd": (lambda z, t: js.distillation_loss(z, t, divergence="jsd", beta=0.3, vocab_mask=mask), (z, zt)),
        "ldist_fkl": (lambda h, w, a, b: js.linear_distillation_loss(h, w, a, b, labels=y, hard_weight=0.5, vocab_chunk=16), (h, w, ht, wt)),
        "ldist_jsd": (lambda h, w, a, b: js.linear_distillation_loss(h, w, a, b, divergence="jsd", vocab_chunk=16, token_chunk=8), (h, w, ht, wt)),
        "ldist_frozen": (lambda h, w: js.linear_distillation_loss(h, w, jax.lax.stop_gradient(ht), wt, divergence="reverse_kl", vocab_chunk=16), (h, w)),
        "sce": (lambda z: js.sharded_cross_entropy(z, y, z_loss=1e-4, **on_mesh), (z,)),
        "slce": (lambda h, w: js.sharded_linear_cross_entropy(h, w, y, vocab_chunk=8, **on_mesh), (h, w)),
        "sldist": (lambda h, w, a, b: js.sharded_linear_distillation_loss(h, w, a, b, labels=y, hard_weight=0.5, vocab_chunk=8, **on_mesh), (h, w, ht, wt)),
    }  # fmt: skip


def fingerprint(out: pathlib.Path) -> dict:
    """Writes each program's canonical text under ``out``; returns name -> hashes."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, (loss, args) in cases().items():
        program = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
        texts = {"cpu": canonical_hlo(program.lower(*args).compile().as_text())}
        if not name.startswith("s"):  # the sharded losses need the 8 CPU devices
            exported = jax.export.export(program, platforms=["cuda"])(*args)
            texts["cuda"] = canonical_mlir(exported.mlir_module())
        for platform, text in texts.items():
            (out / f"{name}.{platform}.txt").write_text(text)
        summary[name] = {p: hashlib.sha1(t.encode()).hexdigest()[:12] for p, t in texts.items()}
        print(name, summary[name], flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="folder for this version's programs")
    parser.add_argument("--compare", nargs=2, type=pathlib.Path, metavar=("BEFORE", "AFTER"),
                        help="compare two folders' summary.json; exit 1 if any program differs")  # fmt: skip
    arguments = parser.parse_args(argv)
    if arguments.compare:
        before, after = (json.loads((f / "summary.json").read_text()) for f in arguments.compare)
        differ = sorted(
            name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
        )
        print(f"compared {len(before)} calls: {len(differ)} differ {differ}")
        return 1 if differ else 0
    if arguments.out is None:
        parser.error("give --out FOLDER or --compare BEFORE AFTER")
    fingerprint(arguments.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
