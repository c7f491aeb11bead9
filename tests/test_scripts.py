"""Smoke tests of the benchmark scripts in --quick mode, on the tiny random model."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_strategies_quick(tiny_recipe, tmp_path, capsys):
    compare = script("compare_strategies")
    out, report_path = tmp_path / "compare", tmp_path / "report.json"
    argv = ["--recipe", str(tiny_recipe()), "--quick", "--out", str(out), "--json", str(report_path)]
    report = compare.main(argv)
    assert set(report["summary"]) == set(compare.STRATEGIES)
    for name, runs in report["runs"].items():
        (run,) = runs  # --quick: one seed
        metrics = [json.loads(line) for line in (out / name / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        assert sum(r.get("candidates", 0) for r in metrics) <= report["budget"]
        assert run["curve"][0]["evaluations"] == 0 and run["curve"][-1]["evaluations"] > 0
    assert report["runs"]["essam"][0]["iterations"] < report["runs"]["es"][0]["iterations"]  # same budget
    assert (out / "strategies.png").stat().st_size > 0
    assert json.loads(report_path.read_text())["summary"] == report["summary"]
    assert "essam-fast" in capsys.readouterr().out
    assert compare.main(argv)["summary"] == report["summary"]  # a rerun reuses the finished runs
