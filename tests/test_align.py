"""`essa align` / `essa export` end to end on the tiny random model: resume, kill, corruption, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from essa.cli import main
from essa.engines import HFEngine
from essa.models import load_tokenizer
from essa.svd import SVDSpace
from tests.conftest import greedy

ROOT = Path(__file__).resolve().parents[1]


def center(run_dir: Path, iteration: int) -> np.ndarray:
    return load_file(str(run_dir / "checkpoints" / f"iter-{iteration:06d}" / "state.safetensors"))["center"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from tests.conftest import write_recipe

    tmp = tmp_path_factory.mktemp("run")
    recipe = write_recipe(tmp / "recipe.toml", tiny_model_dir)
    assert main(["align", str(recipe), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_run_writes_metrics_plot_and_checkpoints(finished_run):
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["heldout_reward"] is not None and "heldout_reward" in rows[2] and "heldout_reward" not in rows[1]
    for key in ("reward_mean", "reward_std", "reward_max", "tokens_per_s", "seconds_generate", "peak_memory_mb"):
        assert key in rows[1]
    assert (finished_run / "reward.png").stat().st_size > 0
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["iter-000003", "iter-000004"]
    assert np.abs(center(finished_run, 4)).sum() > 0
    # sigma 0.5 on a random model's adapter: members write other things than their center
    assert all(0 < r["diverged_share"] <= 1 and r["reward_se"] >= 0 for r in rows[1:])
    assert all(r["candidates"] == 4 + 1 and "rank_correlation" not in r for r in rows[1:])


def test_diagnose_scores_members_on_the_heldout_prompts(tiny_recipe, tmp_path):
    """With a sigma too small to change a token, every member writes its center's completions: nothing
    differs, the rewards have no spread to rank, and the members' held-out reward is the center's."""
    recipe = tiny_recipe(strategy={"population": 4, "sigma": 1e-7}, run={"iterations": 2, "eval_every": 1,
                                                                         "diagnose": True})
    assert main(["align", str(recipe), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for before, row in zip(rows, rows[1:]):
        assert row["diverged_share"] == 0 and row["reward_snr"] == 0 and row["rank_correlation"] == 0
        assert row["center_reward"] == row["reward_mean"] and row["reward_std"] == 0
        assert row["heldout_members_mean"] == before["heldout_reward"] and row["heldout_members_std"] == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert "0% of member completions differ" in page and "rank correlation 0.00" in page


def test_two_plus_resume_two_equals_four_bit_for_bit(tiny_recipe, tmp_path, finished_run):
    recipe = tiny_recipe()
    run = tmp_path / "resumed"
    assert main(["align", str(recipe), "--out", str(run), "--set", "run.iterations=2"]) == 0
    assert main(["align", str(recipe), "--out", str(run), "--resume", "--set", "run.iterations=4"]) == 0
    assert np.array_equal(center(run, 4), center(finished_run, 4))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]


def kill_after_checkpoint(recipe: Path, run: Path, iteration: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "essa", "align", str(recipe), "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / f"iter-{iteration:06d}").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted((run / "checkpoints").glob("iter-*"))
    assert done and done[-1].name < "iter-000004", "the run finished before it could be killed"


def test_killed_run_resumes_exactly(tiny_recipe, tmp_path, finished_run):
    recipe = tiny_recipe()
    run = tmp_path / "killed"
    kill_after_checkpoint(recipe, run, 2)
    assert main(["align", str(recipe), "--out", str(run), "--resume"]) == 0
    assert np.array_equal(center(run, 4), center(finished_run, 4))


@pytest.mark.parametrize("strategy", [{"name": "cma"}, {"name": "essam", "sharpness_population": 2}],
                         ids=["cma", "essam"])
def test_every_strategy_runs_and_resumes_bit_for_bit_after_a_kill(tiny_recipe, tmp_path, strategy):
    recipe = tiny_recipe(strategy=strategy)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["align", str(recipe), "--out", str(straight)]) == 0
    kill_after_checkpoint(recipe, killed, 2)
    assert main(["align", str(recipe), "--out", str(killed), "--resume"]) == 0
    final = [load_file(str(run / "checkpoints" / "iter-000004" / "state.safetensors")) for run in (straight, killed)]
    assert final[0].keys() == final[1].keys() and any(k.startswith("strategy.") for k in final[0])
    assert all(np.array_equal(final[0][k], final[1][k]) for k in final[0])
    assert np.abs(center(straight, 4)).sum() > 0
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    per_iteration = {"cma": 4, "essam": 2 + 4}[strategy["name"]] + 1  # the center joins the first population
    assert all(r["candidates"] == per_iteration for r in rows[1:])
    prompts = json.loads((straight / "recipe.json").read_text())["data"]["prompts_per_iteration"]
    assert all(r["sequences"] == per_iteration * prompts for r in rows[1:])


def test_corrupt_latest_checkpoint_falls_back_to_previous(tiny_recipe, tmp_path, finished_run, capsys):
    recipe = tiny_recipe()
    run = tmp_path / "corrupt"
    assert main(["align", str(recipe), "--out", str(run), "--set", "run.iterations=3",
                 "--set", "run.keep_checkpoints=3"]) == 0
    state = run / "checkpoints" / "iter-000003" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-7])  # a partial write
    assert main(["align", str(recipe), "--out", str(run), "--resume", "--set", "run.iterations=4"]) == 0
    assert "iter-000003 is incomplete or corrupt" in capsys.readouterr().out.replace("\n", "")
    assert np.array_equal(center(run, 4), center(finished_run, 4))


def test_drafted_run_follows_the_undrafted_one(finished_run, tiny_recipe, tmp_path):
    """`generation.speculative` true (every population drafted) and false: the same rewards and centers as
    "auto" (which on a CPU drafts no population of a run this short)."""
    runs = {way: tmp_path / str(way) for way in (True, False)}
    for way, run in runs.items():
        assert main(["align", str(tiny_recipe(generation={"speculative": way})), "--out", str(run)]) == 0
    drafted, plain, auto = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
                            for run in (runs[True], runs[False], finished_run))
    assert all(0 < r["draft_tokens"] <= r["member_tokens"] and 0 < r["draft_acceptance"] <= 1 for r in drafted)
    assert all(r["draft_acceptance"] == 0 and "draft_tokens" not in r for r in plain + auto)
    for key in ("reward_mean", "reward_max", "center_reward", "diverged_share", "generated_tokens"):
        assert [r[key] for r in drafted] == [r[key] for r in plain] == [r[key] for r in auto], key
    assert np.array_equal(center(runs[True], 4), center(runs[False], 4))
    assert np.array_equal(center(runs[True], 4), center(finished_run, 4))


def test_existing_run_needs_resume(finished_run, tiny_recipe, capsys):
    assert main(["align", str(tiny_recipe()), "--out", str(finished_run)]) == 2
    assert "pass --resume" in capsys.readouterr().err


FLAKY = """
calls = 0

def flaky(prompts, completions, **_):
    global calls  # the reward process lives for the whole run, so this counts every call
    calls += 1
    if calls % 3 == 1:
        raise RuntimeError("checker crashed")
    return [float("nan") if calls % 3 == 2 else 0.5] * len(completions)

def broken(prompts, completions, **_):
    raise RuntimeError("always broken")
"""


def test_reward_that_raises_or_returns_nan_does_not_stop_the_run(tiny_recipe, tmp_path, capsys):
    (tmp_path / "flaky.py").write_text(FLAKY)
    run = tmp_path / "flaky"
    assert main(["align", str(tiny_recipe(reward={"name": f"{tmp_path / 'flaky.py'}:flaky"})), "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # NaN scored 0, 0.5 kept: a member's mean over chunks that crashed, returned NaN or 0.5 is in (0, 0.5]
    assert sum(r["reward_failures"] for r in rows) > 0 and 0 < max(r.get("reward_max", 0) for r in rows) <= 0.5
    assert capsys.readouterr().err.count("checker crashed") == 1  # warned once


def test_reward_that_fails_every_row_stops_before_training(tiny_recipe, tmp_path, capsys):
    (tmp_path / "flaky.py").write_text(FLAKY)
    run = tmp_path / "broken"
    recipe = tiny_recipe(reward={"name": f"{tmp_path / 'flaky.py'}:broken"})
    assert main(["align", str(recipe), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "failed on every held-out row (RuntimeError: always broken)" in err and "Traceback" not in err
    assert not list((run / "checkpoints").glob("iter-*"))


def test_exported_adapter_loads_in_peft_and_matches_the_center(finished_run, tiny_model_dir, tmp_path, capsys):
    from tests.conftest import PROMPTS

    out = tmp_path / "adapter"
    assert main(["export", str(finished_run), "--adapter", str(out), "--center", "final"]) == 0
    assert "final center: iteration 4" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and not config["use_dora"] and config["bias"] == "none"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    space = SVDSpace.load(finished_run / "space.safetensors")
    engine = HFEngine(base, tokenizer, space, max_new_tokens=6, batch_rows=64)
    expected = engine.generate(torch.as_tensor(center(finished_run, 4))[None], PROMPTS).completions[0]
    engine.close()
    assert expected != greedy(base, tokenizer, PROMPTS, 6), "the evolved adapter must change outputs"
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    assert greedy(peft_model, tokenizer, PROMPTS, 6) == expected


def test_exported_merged_model_loads_with_transformers(finished_run, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", str(finished_run), "--merged", str(out), "--center", "final"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    space = SVDSpace.load(finished_run / "space.safetensors")
    module = space.modules[0]
    a, b = space.lora_weights(torch.as_tensor(center(finished_run, 4)))[module.name]
    expected = base.get_submodule(module.name).weight + module.scaling * b @ a
    assert torch.allclose(merged.get_submodule(module.name).weight.float(), expected, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(expected, base.get_submodule(module.name).weight)
    assert greedy(merged, load_tokenizer(str(out)), ["Hello"], 4)  # generates


def test_a_search_over_the_lora_factors_runs_resumes_and_exports_its_center(tiny_recipe, tiny_model_dir, tmp_path):
    from tests.conftest import PROMPTS

    recipe = tiny_recipe(svd={"space": "factors"}, strategy={"name": "es", "sigma": 0.05, "learning_rate": 0.02})
    run = tmp_path / "run"
    assert main(["align", str(recipe), "--out", str(run), "--set", "run.iterations=2"]) == 0
    assert main(["align", str(recipe), "--out", str(run), "--resume", "--set", "run.iterations=4"]) == 0
    space = SVDSpace.load(run / "space.safetensors")
    assert space.space == "factors" and center(run, 4).shape == (space.dim,) and np.abs(center(run, 4)).sum() > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["diverged_share"] > 0 for r in rows[1:])
    assert main(["export", str(run), "--adapter", str(tmp_path / "adapter"), "--center", "final"]) == 0
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = HFEngine(base, tokenizer, space, max_new_tokens=6, batch_rows=64)
    expected = engine.generate(torch.as_tensor(center(run, 4))[None], PROMPTS).completions[0]
    engine.close()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert greedy(peft_model, tokenizer, PROMPTS, 6) == expected


def test_a_full_covariance_over_the_factors_is_refused_before_anything_loads(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(svd={"space": "factors"}, strategy={"name": "cma", "covariance": "full"})
    assert main(["align", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "strategy.covariance: a full covariance over every entry of the LoRA factors" in err
    assert not (tmp_path / "run").exists()


def test_export_of_a_non_run_directory_fails_cleanly(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--adapter", str(tmp_path / "a")]) == 2
    assert "is it an `essa align` output" in capsys.readouterr().err


def test_eval_compares_base_and_adapter_side_by_side(finished_run, tiny_model_dir, tiny_recipe, tmp_path, capsys):
    adapter, report_path = tmp_path / "adapter", tmp_path / "report.json"
    assert main(["export", str(finished_run), "--adapter", str(adapter), "--center", "final"]) == 0
    recipe = tiny_recipe()
    assert main(["eval", str(recipe), "--adapter", str(adapter), "--limit", "3", "--report", str(report_path)]) == 0
    assert "essa eval" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert set(report["results"]) == {"base", "adapter"} and report["prompts"] == 3
    assert {"reward_mean", "reward_failures"} <= report["results"]["base"].keys()
    rows = report["completions"]
    assert any(r["base"] != r["adapter"] for r in rows), "the adapter must change some output"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    from essa.data import load_splits, render
    from essa.recipe import load

    r = load(recipe)
    _, heldout = load_splits(r.data, r.run.seed)
    prompts = render(tokenizer, heldout.prompts()[:3], r.data)
    assert [row["base"] for row in rows] == greedy(base, tokenizer, prompts, 6)  # base = zero delta, exactly
    assert main(["eval", str(recipe), "--adapter", str(tmp_path / "none")]) == 2

    # Several adapters: the base model once, each adapter under its path, the same outputs as alone.
    best = tmp_path / "best"
    assert main(["export", str(finished_run), "--adapter", str(best), "--center", "best"]) == 0
    both_path = tmp_path / "both.json"
    assert main(["eval", str(recipe), "--adapter", str(adapter), "--adapter", str(best), "--limit", "3",
                 "--report", str(both_path)]) == 0
    both = json.loads(both_path.read_text())
    assert list(both["results"]) == ["base", str(adapter), str(best)]
    assert [r["base"] for r in both["completions"]] == [r["base"] for r in rows]
    assert [r[str(adapter)] for r in both["completions"]] == [r["adapter"] for r in rows]
