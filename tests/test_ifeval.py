"""The IFEval reward against the reference implementation's verdicts on its GPT-4 responses."""

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the IFEval reward needs the ifeval extra (lm-eval)")

from essa.rewards import ifeval  # noqa: E402

from essa.data import data_dirs  # noqa: E402


@pytest.fixture(scope="module")
def reference() -> Path:
    for root in data_dirs():
        if (root / "ifeval" / "gpt4_responses.jsonl").is_file():
            return root / "ifeval"
    pytest.skip("../shared/data is not beside the checkout")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("mode", ["strict", "loose"])
def test_reproduces_the_reference_verdicts_row_by_row(reference, mode):
    inputs = {r["prompt"]: r for r in load(reference / "input_data.jsonl")}
    responses = {r["prompt"]: r["response"] for r in load(reference / "gpt4_responses.jsonl")}
    rows = load(reference / f"gpt4_eval_results_{mode}.jsonl")
    agree = sum(ifeval.verdicts(r["prompt"], responses[r["prompt"]], inputs[r["prompt"]]["instruction_id_list"],
                                inputs[r["prompt"]]["kwargs"], loose=mode == "loose") == r["follow_instruction_list"]
                for r in rows)
    print(f"IFEval {mode}: {agree}/{len(rows)} rows agree with the reference")
    assert len(rows) == 540 and agree / len(rows) >= 0.99


def test_reward_modes():
    ids, kwargs = [["change_case:english_lowercase", "punctuation:no_comma"]], [[{}, {}]]
    assert ifeval.reward(["p"], ["all lowercase, but a comma"], ids, kwargs) == [0.5]
    assert ifeval.reward(["p"], ["all lowercase, but a comma"], ids, kwargs, per_prompt="all") == [0.0]
    assert ifeval.reward(["p"], ["fine and lowercase"], ids, kwargs, per_prompt="all") == [1.0]
    assert ifeval.reward(["p"], ["Title line\nall lowercase"], [["change_case:english_lowercase"]], [[{}]],
                         mode="loose") == [1.0]
    assert ifeval.reward(["p"], [""], ids, kwargs) == [0.0]


def test_sentence_fallback():
    assert ifeval.count_sentences("One. Two! Three? \"Four.\" Five") == 5
    assert ifeval.count_sentences("Mr. smith went home. He slept.") == 2


def test_essa_score_on_the_gpt4_responses_matches_the_reference(reference, tmp_path, capsys):
    from essa.cli import main

    out = tmp_path / "scored.jsonl"
    assert main(["score", "--reward", "ifeval", "--input", str(reference / "gpt4_responses.jsonl"),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prompt_level_strict:" in printed and "instruction_level_loose:" in printed
    scored = {r["prompt"]: r for r in load(out)}
    assert len(scored) == 541 and sum(r["reward"] is None for r in scored.values()) == 1
    for mode in ("strict", "loose"):
        rows = load(reference / f"gpt4_eval_results_{mode}.jsonl")
        agree = sum(scored[r["prompt"]][f"follow_instruction_list_{mode}"] == r["follow_instruction_list"]
                    for r in rows)
        assert agree / len(rows) >= 0.99, (mode, agree)


def test_generated_prompts_are_deterministic_and_checkable():
    rows = ifeval.generate_examples(40, seed=3)
    assert rows == ifeval.generate_examples(40, seed=3)
    assert all(1 <= len(r["instruction_id_list"]) <= 3 and len(r["kwargs"]) == len(r["instruction_id_list"])
               for r in rows)
    assert len({i for r in rows for i in r["instruction_id_list"]}) >= 15  # varied instructions
    scores = ifeval.reward([r["prompt"] for r in rows], ["A plain answer."] * 40,
                           [r["instruction_id_list"] for r in rows], [r["kwargs"] for r in rows])
    assert all(0 <= s <= 1 for s in scores)


def test_ifeval_recipe_trains_on_generated_prompts_and_holds_out_the_real_ones(reference):
    from essa.data import load_splits
    from essa.recipe import DataSection

    cfg = DataSection(source="ifeval-generated", heldout_source="google/IFEval", train_size=50, heldout_size=541)
    train, heldout = load_splits(cfg, seed=0)
    real = {r["prompt"] for r in load(reference / "input_data.jsonl")}
    assert len(train) == 50 and not set(train.prompts()) & real
    assert len(heldout) == 541 and set(heldout.prompts()) == real
    assert {"instruction_id_list", "kwargs"} <= heldout.columns().keys()


def test_verdicts_are_reproducible_where_lm_eval_draws_random_arguments(reference):
    row = next(r for r in load(reference / "input_data.jsonl") if r["key"] == 1122)  # letter '#': random letter
    response = {r["prompt"]: r["response"] for r in load(reference / "gpt4_responses.jsonl")}[row["prompt"]]
    runs = {tuple(ifeval.verdicts(row["prompt"], response, row["instruction_id_list"], row["kwargs"], loose=True))
            for _ in range(10)}
    assert len(runs) == 1


def test_language_verdicts_are_reproducible():
    """langdetect draws at random; this answer is Spanish in some draws and English in others."""
    runs = {tuple(ifeval.verdicts("Answer in Spanish.", "Hola my friend, ciao", ["language:response_language"],
                                  [{"language": "es"}])) for _ in range(30)}
    assert len(runs) == 1


def test_ifeval_metrics_break_strict_accuracy_down_by_instruction_type():
    from essa.rewards.ifeval import accuracies as ifeval_metrics

    rows = [{"instruction_id_list": ["a:x", "b:y"], "follow_instruction_list_strict": [True, False],
             "follow_instruction_list_loose": [True, True]},
            {"instruction_id_list": ["a:x"], "follow_instruction_list_strict": [False],
             "follow_instruction_list_loose": [True]}]
    metrics = ifeval_metrics(rows)
    assert metrics["prompt_level_strict"] == 0.0 and metrics["prompt_level_loose"] == 1.0
    assert metrics["instruction_level_strict"] == 1 / 3
    assert metrics["strict a:x"] == 0.5 and metrics["strict b:y"] == 0.0
