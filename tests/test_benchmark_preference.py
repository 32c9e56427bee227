"""experiments/benchmark_preference.py on a tiny shape (its timed run is the lead's, not CI's)."""

import importlib.util
import pathlib
import sys

import jax.numpy as jnp
import numpy as np


def test_preference_benchmark_script_checks_times_and_reports(tmp_path, monkeypatch):
    """The fused DPO step agrees with the two logits paths, the timed and memory rows carry
    every competitor and ratio, the tables are written (a TPU row's too), and a wrong
    competitor is reported as disagreeing."""
    folder = pathlib.Path(__file__).resolve().parents[1] / "experiments"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(
        "benchmark_preference", folder / "benchmark_preference.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shape = (4, 5, 8, 40)  # 2 pairs of responses, 5 tokens each
    names = ("fused", "logits + ours", "logits + optax")
    # The timing harness is tested in tests/test_benchmark.py; fixed seconds here.
    rounds = [dict(zip(names, (1.0, 2.0, 3.0))), dict(zip(names, (1.0, 4.0, 5.0)))]
    monkeypatch.setattr(script.harness, "time_rounds", lambda callables, repeats: rounds)
    timed = script.case_time(shape, jnp.float32, repeats=1)
    assert timed["agree"] and set(timed["seconds"]) == set(names)
    assert np.isfinite(timed["loss"]) and timed["loss"] != np.log(2.0)  # the reference counts
    assert timed["fused / logits + ours"] == 1.0 / 3.0  # medians 1 and 3
    memory = script.case_memory(shape, jnp.float32)
    assert set(memory["temp_bytes"]) == set(names)
    hlo = "%a = f32[20,40]{1,0} p(pred[20,40] %b, bf16[4,5,8] %c, s32[4,5,8] %d)"
    assert script.largest_array(hlo) == "f32[20,40]"
    # A TPU row as case_tpu_memory makes it (compiling for a TPU needs libtpu: not here).
    tpu = dict(kind="tpu memory", topology="v5e:1x1", shape=list(shape), dtype="float32",
               temp_bytes=dict(zip(names, (2**20, 2**30, 2**25))),
               fits=dict(zip(names, (True, False, True))),
               large_buffers=dict(zip(names, ([], [], ["copy f32[20,40]"]))))  # fmt: skip
    script.add_ratios(tpu)
    assert tpu["logits + ours / fused"] == 1024
    meta = dict(device="cpu", jax="x", python="x", command="c")
    script.write_markdown(tmp_path / "results.md", meta, [memory, tpu, timed])
    text = (tmp_path / "results.md").read_text()
    assert "| (4, 5, 8, 40) | float32 | True |" in text
    assert "| 1.0 | 1,024.0 (over the chip) | 32.0 | 1,024x | 32x | none |" in text
    results = {n: (np.zeros(()), (np.ones((2,)),)) for n in ("a", "b")}  # NumPy: no programs
    results["b"] = (np.zeros(()), (2 * np.ones((2,)),))
    assert not script.harness.agree(results, jnp.float32)
    for sibling in ("harness", "common"):  # the helper modules it imported, not the suite's
        sys.modules.pop(sibling, None)
