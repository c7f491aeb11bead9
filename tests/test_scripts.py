"""Smoke tests of the benchmark scripts in --quick mode, on the tiny random model."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.scripts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the scripts import their shared helpers as `python scripts/x.py` does


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
    for summary in report["summary"].values():
        assert summary["search_gain_mean"] == pytest.approx(summary["final_mean"] - summary["initial_mean"])
    for name, runs in report["runs"].items():
        (run,) = runs  # --quick: one seed
        metrics = [json.loads(line) for line in (out / name / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        assert sum(r.get("sequences", 0) for r in metrics) <= report["budget"]
        assert run["curve"][0]["sequences"] == 0 and run["curve"][-1]["sequences"] > 0
    assert report["runs"]["essam"][0]["iterations"] < report["runs"]["es"][0]["iterations"]  # same budget
    assert (out / "strategies.png").stat().st_size > 0
    assert json.loads(report_path.read_text())["summary"] == report["summary"]
    assert "essam-fast" in capsys.readouterr().out
    assert compare.main(argv)["summary"] == report["summary"]  # a rerun reuses the finished runs


def test_compare_strategies_variants_share_the_sequence_budget(tiny_recipe, tmp_path):
    compare = script("compare_strategies")
    argv = ["--recipe", str(tiny_recipe()), "--quick", "--out", str(tmp_path), "--variant", "both: svd.factors=both",
            "--variant", "b-pop8: svd.factors=b strategy.population=8"]
    report = compare.main(argv)
    assert list(report["summary"]) == ["both", "b-pop8"]
    # --quick: population 4 x 2 prompts, so 2 iterations; population 8 sees the 16 sequences in 1.
    assert [report["summary"][n]["iterations"] for n in ("both", "b-pop8")] == [2, 1]
    recipe = json.loads((tmp_path / "b-pop8" / "seed-0" / "recipe.json").read_text())
    assert recipe["svd"]["factors"] == "b" and recipe["strategy"]["population"] == 8
    with pytest.raises(SystemExit, match="--variant"):
        compare.main(["--recipe", str(tiny_recipe()), "--variant", "no overrides"])


def test_compare_strategies_records_finished_runs_for_a_later_session(tiny_recipe, tmp_path):
    """A campaign over sessions: records outlive the run directories (runs/ is not committed)."""
    import shutil

    compare = script("compare_strategies")
    argv = ["--recipe", str(tiny_recipe()), "--quick", "--out", str(tmp_path / "runs"), "--record",
            str(tmp_path / "record"), "--variant", "a: strategy.sigma=0.5", "--variant", "b: strategy.sigma=1.0"]
    first = compare.main(argv)
    record = json.loads((tmp_path / "record" / "b" / "seed-0.json").read_text())
    assert "strategy.sigma=1.0" in record["overrides"] and record["rows"][-1]["iteration"] == 2
    assert record["summary"]["final_heldout_reward"] == record["rows"][-1]["heldout_reward"]
    shutil.rmtree(tmp_path / "runs")  # a fresh checkout: only the committed records are left
    assert compare.main(argv)["summary"] == first["summary"]
    assert not (tmp_path / "runs" / "a").exists()  # nothing was run again
    # A record made with other overrides is not reused: the variant runs.
    changed = [a.replace("sigma=1.0", "sigma=2.0") for a in argv]
    compare.main(changed)
    assert (tmp_path / "runs" / "b" / "seed-0" / "summary.json").exists()
    assert "strategy.sigma=2.0" in json.loads((tmp_path / "record" / "b" / "seed-0.json").read_text())["overrides"]


def test_bench_population_quick_reports_every_precision(tiny_model_dir, tmp_path, capsys):
    bench = script("bench_population")
    report = bench.main(["--model", str(tiny_model_dir), "--quick", "--precisions", ",".join(bench.PRECISIONS),
                         "--no-vllm-baseline", "--json", str(tmp_path / "population.json"),
                         "--plot", str(tmp_path / "population.png")])
    rows = report["results"]
    assert [r["precision"] for r in rows] == list(bench.PRECISIONS)
    for row in rows:
        assert row["generate_tokens_per_s"] > 0 and row["population_tokens_per_s"] > 0
        # Both sides are timings (a busy CPU slows the roofline's tiny matmuls most), so only their ratio's arithmetic
        assert row["roofline_tokens_per_s"] > 0 and row["roofline_gflops"] > 0
        assert row["ratio_to_roofline"] == pytest.approx(row["population_tokens_per_s"] / row["roofline_tokens_per_s"])
        assert row["ratio_to_generate"] == pytest.approx(row["population_tokens_per_s"] / row["generate_tokens_per_s"])
        assert 0 < row["term_share"] < 1
        # the engine's 4-bit path beside bitsandbytes' kernel alone, where bitsandbytes repacks (AVX512-BF16)
        beside = row["precision"] == "nf4" and has_avx512bf16()
        assert (row["population_bnb_kernel_tokens_per_s"] or 0) > 0 if beside else \
            row["population_bnb_kernel_tokens_per_s"] is None
    assert json.loads((tmp_path / "population.json").read_text()) == json.loads(json.dumps(report))
    assert "nf4" in capsys.readouterr().out
    assert (tmp_path / "population.png").stat().st_size > 0


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_bench_dense4bit_quick_times_each_path_of_every_4bit_layer(tiny_model_dir, tmp_path):
    report = script("bench_dense4bit").main(["--model", str(tiny_model_dir), "--quick",
                                             "--json", str(tmp_path / "w.json")])
    assert [r["rows"] for r in report["results"]] == [1, 64]
    for row in report["results"]:
        assert row["kernel_ms"] > 0 and row["plain_ms"] > 0 and row["dense_ms"] > 0
        assert row["kernel_over_dense"] == pytest.approx(row["kernel_ms"] / row["dense_ms"])
    assert json.loads((tmp_path / "w.json").read_text()) == json.loads(json.dumps(report))


def test_bench_population_can_skip_plain_generate(tiny_model_dir):
    report = script("bench_population").main(["--model", str(tiny_model_dir), "--quick", "--precisions", "fp32",
                                              "--no-vllm-baseline", "--no-generate-baseline"])
    (row,) = report["results"]
    assert row["generate_tokens_per_s"] is None and row["ratio_to_generate"] is None
    assert row["population_tokens_per_s"] > 0


def test_bench_population_drafted_measures_both_ways_per_sigma(tiny_model_dir):
    report = script("bench_population").main(["--model", str(tiny_model_dir), "--quick", "--precisions", "fp32",
                                              "--no-vllm-baseline", "--no-generate-baseline", "--drafted",
                                              "--sigmas", "0.0,3.0"])
    near, far = report["results"]
    assert (near["sigma"], far["sigma"]) == (0.0, 3.0)
    for row in (near, far):
        assert row["population_tokens_per_s"] > 0 and row["drafted_tokens_per_s"] > 0
        assert row["drafted_ratio_to_undrafted"] == pytest.approx(row["drafted_tokens_per_s"]
                                                                  / row["population_tokens_per_s"])
    # members equal to their center take from its drafts all the tokens that its text re-tokenizes to
    # (a random model's text does not always); members far from it take fewer
    assert near["draft_acceptance"] > far["draft_acceptance"]


@pytest.mark.parametrize("shape, billions", [("qwen2.5-0.5b", 0.494), ("qwen2.5-1.5b", 1.544), ("qwen2.5-7b", 7.616)])
def test_random_models_have_the_published_parameter_counts(shape, billions):
    config = script("random_models").config_for(shape, vocab_size=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)


def test_bench_memory_quick_measures_three_processes(tiny_recipe, tmp_path):
    bench = script("bench_memory")
    report = bench.main(["--recipe", str(tiny_recipe()), "--quick", "--json", str(tmp_path / "memory.json"),
                         "--plot", str(tmp_path / "memory.png")])
    assert set(report["results"]) == {"inference", "essa", "grpo"}
    for row in report["results"].values():
        assert row["imported_rss_mb"] > 100  # torch alone is more than 100 MiB
        assert row["peak_rss_mb"] >= row["work_peak_rss_mb"] >= row["loaded_rss_mb"] > row["imported_rss_mb"]
        assert row["work_added_rss_mb"] == pytest.approx(row["work_peak_rss_mb"] - row["loaded_rss_mb"])
    results, ratios = report["results"], report["ratios"]
    assert {"load model", "SVD of the adapted layers", "generate"} <= set(results["essa"]["phase_peak_rss_mb"])
    assert {"generate", "log-probabilities forward", "rest of the step (backward)"} <= set(
        results["grpo"]["phase_peak_rss_mb"])
    assert max(results["grpo"]["phase_peak_rss_mb"].values()) <= results["grpo"]["peak_rss_mb"] + 1
    assert ratios["grpo_over_essa_work_added_rss_mb"] == pytest.approx(
        results["grpo"]["work_added_rss_mb"] / results["essa"]["work_added_rss_mb"])
    assert ratios["essa_over_inference_work_peak_rss_mb"] == pytest.approx(
        results["essa"]["work_peak_rss_mb"] / results["inference"]["work_peak_rss_mb"])
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_bench_memory_splits_the_warm_starts_peak_from_the_searchs(tiny_recipe, tmp_path):
    from tests.test_warm_start import REWARDS, WARM

    (tmp_path / "rewards.py").write_text(REWARDS)
    recipe = tiny_recipe(warm_start=WARM, reward={"name": f"{tmp_path / 'rewards.py'}:length"})
    report = script("bench_memory").main(["--recipe", str(recipe), "--quick", "--workers", "essa"])
    (essa,) = report["results"].values()
    phases = essa["phase_peak_rss_mb"]
    assert {"warm start: sampling / generate", "warm start: fine-tune", "generate"} <= set(phases)
    assert essa["warm_start_peak_rss_mb"] == max(mb for p, mb in phases.items()
                                                 if p.startswith("warm start") and "load model" not in p)
    assert essa["search_peak_rss_mb"] == max(phases["generate"], phases["SVD of the adapted layers"])
    assert essa["warm_start_over_search_peak_rss"] == pytest.approx(
        essa["warm_start_peak_rss_mb"] / essa["search_peak_rss_mb"])
    assert essa["warm_start_sft_steps"] >= 1 and essa["warm_start_seconds_fine_tune"] > 0
    assert essa["warm_start_seconds_sampling"] > 0
    assert report["ratios"] == {}  # one worker: nothing to compare it with


def test_compare_grpo_quick_runs_both_methods_on_the_same_budget(tiny_recipe, tmp_path):
    compare = script("compare_grpo")
    argv = ["--recipe", str(tiny_recipe()), "--quick", "--seeds", "0,1", "--test", "data.heldout_size=3",
            "--out", str(tmp_path / "out"), "--json", str(tmp_path / "grpo.json")]
    report = compare.main(argv)
    essa_curve = report["essa"]["curve"]
    assert [p["step"] for p in essa_curve] == [0, 1, 2]  # --quick: 2 iterations, evaluated after each
    (grpo,) = report["grpo"].values()
    assert grpo["curve"][0] == {"step": 0, "seconds": 0.0, "heldout_reward": essa_curve[0]["heldout_reward"]}
    assert grpo["curve"][-1]["step"] >= 1 and grpo["train_seconds"] >= report["essa"]["train_seconds"]
    summary = report["summary"]
    assert summary["target"] == max(summary["final_heldout_reward"].values())
    assert summary["seconds_to_grpo_final"]["grpo"] <= grpo["train_seconds"]  # its curve reaches its own final
    assert (tmp_path / "out" / "essa_vs_grpo.png").stat().st_size > 0
    # The second seed reruns both final configurations, and each final adapter is scored on the test set.
    assert set(report["seeds"]) == {0, 1}
    assert (tmp_path / "out" / "essa-seed1" / "summary.json").exists()
    for seed in report["seeds"].values():
        for method in ("essa", "grpo"):
            assert {"base", "adapter"} == set(seed["test"][method])
            assert 0 <= seed["test"][method]["adapter"]["reward_mean"] <= 1
    # Both methods start from the base model, and the test set is the same for both.
    tests = report["seeds"][0]["test"]
    assert tests["essa"]["base"] == tests["grpo"]["base"]
    assert report["across_seeds"]["essa_test"]["reward_mean"]["min"] <= report["across_seeds"][
        "essa_test"]["reward_mean"]["max"]
    assert compare.main(argv)["summary"] == summary  # a rerun reuses the finished runs


def test_compare_grpo_starts_grpo_from_essas_warm_start(tiny_recipe, tmp_path):
    from tests.test_warm_start import REWARDS, WARM

    (tmp_path / "rewards.py").write_text(REWARDS)
    recipe = tiny_recipe(warm_start=WARM, reward={"name": f"{tmp_path / 'rewards.py'}:length"})
    report = script("compare_grpo").main(["--recipe", str(recipe), "--quick", "--out", str(tmp_path / "out")])
    (grpo,) = report["grpo"].values()
    assert (tmp_path / "out" / "essa-seed0" / "warm_start" / "adapter").is_dir()
    # GRPO's first held-out evaluation is of the warm-start adapter (essa's row 0), and it trained that
    # adapter: its A matrices are a few small steps from the warm start's, not a fresh random init.
    assert grpo["curve"][0]["heldout_reward"] == report["essa"]["curve"][0]["heldout_reward"]
    warm = load_file(str(tmp_path / "out" / "essa-seed0" / "warm_start" / "adapter" / "adapter_model.safetensors"))
    (trained_dir,) = (tmp_path / "out").glob("grpo-*-seed0")
    trained = load_file(str(trained_dir / "adapter" / "adapter_model.safetensors"))
    a = [k for k in warm if "lora_A" in k]
    assert a and set(a) <= set(trained)
    assert max(float((trained[k] - warm[k]).norm() / warm[k].norm()) for k in a) < 0.2


def test_compare_grpo_summary_times_essa_to_grpos_final():
    def run(points: list[tuple[float, float]], lr: float = 0.0) -> dict:
        return {"curve": [{"step": i, "seconds": t, "heldout_reward": r} for i, (t, r) in enumerate(points)],
                "peak_rss_mb": 100.0, "train_seconds": points[-1][0], "learning_rate": lr, "prompts_per_step": 1}

    essa = run([(0, 0.3), (100, 0.4), (200, 0.6)])
    grpo = {"a": run([(0, 0.3), (150, 0.35), (300, 0.32)], 1e-3), "b": run([(0, 0.3), (150, 0.45), (300, 0.5)], 1e-2)}
    summary = script("compare_grpo").summarize(essa, grpo)
    assert summary["grpo_best"] == "b" and summary["grpo_best_learning_rate"] == 0.01
    assert summary["final_heldout_reward"] == {"essa": 0.6, "grpo": 0.5}
    assert summary["seconds_to_target"] == {"essa": 200, "grpo": None}  # GRPO never reaches essa's 0.6
    assert summary["seconds_to_grpo_final"] == {"essa": 200, "grpo": 300}
    assert summary["essa_over_grpo_seconds_to_grpo_final"] == pytest.approx(2 / 3)


def test_ablations_quick_compare_quantizations_and_populations_at_equal_sequences(tiny_recipe, tmp_path, capsys):
    ablations = script("ablations")
    reports = ablations.main(["--recipe", str(tiny_recipe()), "--quick", "--out", str(tmp_path),
                              "--json", str(tmp_path / "ablations.json")])
    assert list(reports["quantization"]["summary"]) == ["none", "int8", "nf4"]
    for setting in ("int8", "nf4"):
        recipe = json.loads((tmp_path / "quantization" / setting / "seed-0" / "recipe.json").read_text())
        assert recipe["model"]["quantization"] == setting
    population = reports["population"]["summary"]
    assert list(population) == ["4", "8", "16", "32"]
    # --quick: 16 sequences of 2 prompts each, so population 4 gets 2 iterations and 8 or more get one.
    assert [population[p]["iterations"] for p in population] == [2, 1, 1, 1]
    for name in ("quantization", "population"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| nf4 | 2 |" in printed and "| 32 | 1 |" in printed  # the tables, with each setting's iterations
    assert json.loads((tmp_path / "ablations.json").read_text())["population"]["summary"] == population
    # --settings picks some of each ablation's settings; finished runs are reused.
    some = ablations.main(["--recipe", str(tiny_recipe()), "--quick", "--out", str(tmp_path), "--settings", "nf4,8"])
    assert [list(r["summary"]) for r in some.values()] == [["nf4"], ["8"]]
    assert some["population"]["summary"]["8"] == population["8"]


def test_eval_table_merges_reports_and_refuses_a_different_base(tmp_path):
    def report(path, adapters, base=0.25):
        results = {"base": {"prompt_level_strict": base, "reward_failures": 0, "strict a:x": 0.5}}
        results |= {name: {"prompt_level_strict": v, "reward_failures": 0, "strict a:x": v} for name, v in adapters}
        single = len(adapters) == 1
        path.write_text(json.dumps({"adapter": adapters[0][0] if single else None,
                                    "results": {("adapter" if single and k != "base" else k): v
                                                for k, v in results.items()}}))
        return path

    table = script("eval_table")
    first = report(tmp_path / "a.json", [("s0", 0.30)])
    second = report(tmp_path / "b.json", [("s1", 0.40), ("s2", 0.20)])
    main, per_type = table.main([str(first), str(second)])
    row = "| prompt_level_strict | 0.2500 | 0.3000 | 0.4000 | 0.2000 | 0.3000 ± 0.0816 | 0.2000 – 0.4000 | +0.0500 |"
    assert row in main
    assert "reward_failures" not in main
    assert "| a:x | 0.500 | 0.300 | -0.200 |" in per_type
    with pytest.raises(SystemExit, match="differ"):
        table.main([str(first), str(report(tmp_path / "c.json", [("s3", 0.1)], base=0.3))])


def test_paired_runs_pairs_the_gains_by_seed(tmp_path, capsys):
    def run(name, base, final, seconds, tokens, generate):
        path = tmp_path / name
        path.mkdir()
        (path / "summary.json").write_text(json.dumps({"baseline_heldout_reward": base, "final_heldout_reward": final,
                                                       "best_heldout_reward": final, "seconds_this_session": seconds}))
        (path / "metrics.jsonl").write_text(json.dumps({"generated_tokens": tokens, "seconds_generate": generate}))

    run("old-s0", 0.3, 0.4, 200.0, 1000, 10.0)
    warm = tmp_path / "new-s2"
    run("new-s2", 0.5, 0.6, 100.0, 1000, 5.0)
    summary = json.loads((warm / "summary.json").read_text()) | {"warm_start": {"base_heldout_reward": 0.25}}
    (warm / "summary.json").write_text(json.dumps(summary))
    run("new-s0", 0.3, 0.35, 100.0, 1000, 5.0)
    run("old-s1", 0.2, 0.2, 300.0, 1000, 10.0)
    run("new-s1", 0.2, 0.3, 150.0, 1000, 4.0)
    report = script("paired_runs").main(["--runs", str(tmp_path), "--a", "old", "--b", "new", "--seeds", "0,1",
                                         "--json", str(tmp_path / "out.json")])
    assert [round(r["gain_difference"], 6) for r in report["seeds"]] == [-0.05, 0.1]
    assert report["summary"]["gain_difference"]["mean"] == pytest.approx(0.025)
    assert report["summary"]["speedup_wall"]["mean"] == pytest.approx(2.0)
    assert report["seeds"][1]["speedup_tokens_per_s"] == pytest.approx(2.5)
    assert json.loads((tmp_path / "out.json").read_text())["summary"] == report["summary"]
    assert "paired difference +0.025" in capsys.readouterr().out
    with_warm_start = script("paired_runs").side(warm)
    assert with_warm_start["gain"] == pytest.approx(0.35) and with_warm_start["after_warm_start"] == 0.5


def test_member_agreement_separates_the_engines_numerics_from_sigma(tiny_recipe, tmp_path):
    """In float32 a 1e-6 offset changes no greedy token, so nothing differs there; a large σ does."""
    report = script("member_agreement").main(["--recipe", str(tiny_recipe()), "--sigmas", "1e-6,5", "--members", "3",
                                              "--prompts", "4", "--json", str(tmp_path / "agreement.json")])
    tiny, large = report["rows"]
    assert tiny["member_vs_center"] == tiny["member_vs_member"] == tiny["center_vs_center_alone"] == 0
    assert tiny["members_reward"] == tiny["center_reward"]
    assert large["member_vs_center"] > 0 and large["member_vs_member"] > 0
    assert json.loads((tmp_path / "agreement.json").read_text())["rows"] == report["rows"]


def test_search_study_runs_expert_iteration_at_the_budget_and_draws_its_curve(tiny_recipe, tmp_path):
    warm = {"method": "rejection", "prompts": 2, "samples_per_prompt": 2, "temperature": 1.0, "epochs": 1.0,
            "batch_size": 2}
    recipe = tiny_recipe(warm_start=warm, data={"heldout_size": 3})
    records = tmp_path / "records"
    argv = ["--recipe", str(recipe), "--records", str(records), "--budget", "8", "--seeds", "0",
            "--expert-iteration", "ei: warm_start.learning_rate=0.01", "--out", str(tmp_path / "runs"),
            "--plot", str(tmp_path / "curves.png"), "--json", str(tmp_path / "study.json")]
    report = script("search_study").main(argv)
    (run,) = report["curves"]["ei"]
    # 8 sequences after the warm start at 2 prompts x 2 samples per round: rounds 2 and 3
    assert [p["sequences"] for p in run["curve"]] == [0, 4, 8]
    recorded = json.loads((records / "ei" / "seed-0.json").read_text())
    assert recorded["summary"]["warm_start"]["rounds"][0]["heldout_reward_before"] == run["curve"][0]["heldout_reward"]
    assert run["curve"][-1]["heldout_reward"] == recorded["rows"][0]["heldout_reward"]
    own = run["curve"][-1]["heldout_reward"] - run["curve"][0]["heldout_reward"]
    assert report["summary"]["ei"]["own_part"] == [own]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert script("search_study").main(argv)["curves"] == report["curves"]  # a rerun reuses the record
    # compare_grpo.py's records beside them (records/grpo/) are its own format: left to it
    (records / "grpo").mkdir()
    (records / "grpo" / "seed-0.json").write_text(json.dumps({"summary": {}, "seeds": {}}))
    assert set(script("search_study").main(argv)["curves"]) == {"ei"}
