"""The benchmark script runs end to end in its quick mode and writes its three files."""

import importlib.util
import json
import os


def test_benchmark_quick_run(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmark.py")
    spec = importlib.util.spec_from_file_location("benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.main(["--quick", "--out", str(tmp_path), "--repeats", "1"])
    assert {r["case"] for r in rows} == {1, 2, 3}
    assert all(r.get("agree", True) for r in rows)
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["meta"]["quick"] is True
    assert (tmp_path / "results.md").read_text().startswith("# Benchmarks")
    assert (tmp_path / "chart.png").stat().st_size > 0
