import json

import numpy as np
import pytest
from essa.rewards import format_instructions as fi

from essa.data import load_splits, minibatch, render
from essa.errors import EssaError
from essa.models import load_tokenizer
from essa.recipe import DataSection
from essa.scoring import Scorer


@pytest.mark.parametrize("instruction, good, bad", [
    ({"id": "lowercase"}, "all lowercase here, every word.", "Every Word Is Capitalized Here Now."),
    ({"id": "no_commas"}, "no commas at all in here", "one, two, three, four"),
    ({"id": "max_words", "kwargs": {"max_words": 6}}, "six short words in this answer",
     "this answer has far too many words in it, far more than six"),
    ({"id": "end_phrase", "kwargs": {"end_phrase": "that is all."}}, "Cats nap. That is all.",
     "Cats nap all day long."),
    ({"id": "quoted"}, '"a quoted answer of five"', "not quoted at all here"),
])
def test_checkers_score_good_above_bad(instruction, good, bad):
    assert fi.score_response(good, [instruction]) == 1.0
    assert fi.score_response(bad, [instruction]) == 0.0


def test_checkers_are_graded():
    assert fi.score_response("Two Capitals in five words", [{"id": "lowercase"}]) == pytest.approx(0.6)
    assert fi.score_response("x, y and then z", [{"id": "no_commas"}]) == pytest.approx(2 / 3)
    end = [{"id": "end_phrase", "kwargs": {"end_phrase": "that is all."}}]
    assert fi.score_response("that is all. more to say", end) == 0.5
    two = [{"id": "lowercase"}, {"id": "quoted"}]
    assert fi.score_response("lower but unquoted and long", two) == 0.5


def test_an_answer_too_short_to_be_one_scores_little():
    instructions = [{"id": "lowercase"}, {"id": "no_commas"}]
    assert fi.score_response("", instructions) == 0.0
    assert fi.score_response("ok", instructions) == pytest.approx(1 / 5)  # follows both, in 1 of 5 words
    assert fi.score_response("a plain lowercase answer here", instructions) == 1.0


ANSWER = ("Rivers carry water from the hills to the sea, and they shape the land as they go. Many towns grew "
          "beside them, because people needed water, fish and a way to travel. In spring the snow")


def test_repair_follows_every_instruction_and_pair():
    """Quotes and an ending phrase cannot both hold (the phrase then ends inside the quotes): 0.75."""
    scores: dict[tuple, set] = {}
    for example in fi.generate_examples(600, seed=1, topics=fi.TOPICS):
        [text] = fi.repair([example["prompt"]], [ANSWER], [example["instructions"]])
        ids = tuple(sorted(i["id"] for i in example["instructions"]))
        scores.setdefault(ids, set()).add(fi.score_response(text, example["instructions"]))
    assert len(scores) == 15  # every instruction alone and every pair
    assert all(s == ({0.75} if ids == ("end_phrase", "quoted") else {1.0}) for ids, s in scores.items()), scores


def test_repair_keeps_whole_sentences_within_the_word_limit_and_the_phrase():
    limit = [{"id": "max_words", "kwargs": {"max_words": 20}},
             {"id": "end_phrase", "kwargs": {"end_phrase": "that is all."}}]
    assert fi.repair_one(ANSWER, limit) == ("Rivers carry water from the hills to the sea, and they shape the land as "
                                            "they go. that is all.")
    assert fi.repair_one("Cut off mid", [{"id": "quoted"}]) == '"Cut off mid"'


def test_generated_prompts_are_deterministic_and_heldout_topics_are_unseen():
    cfg = DataSection(train_size=200, heldout_size=50)
    train, heldout = load_splits(cfg, seed=0)
    again, _ = load_splits(cfg, seed=0)
    assert train.rows == again.rows and len(train) == 200 and len(heldout) == 50
    heldout_topics = set(fi.TOPICS[::4])
    assert not any(t in p for p in train.prompts() for t in heldout_topics)
    assert all(any(t in p for t in heldout_topics) for p in heldout.prompts())
    assert all(1 <= len(r["instructions"]) <= 2 for r in train.rows)
    assert train.columns().keys() == {"instructions"}


def test_minibatch_is_a_pure_function_of_seed_and_iteration():
    assert np.array_equal(minibatch(100, 8, 0, 5), minibatch(100, 8, 0, 5))
    assert not np.array_equal(minibatch(100, 8, 0, 5), minibatch(100, 8, 0, 6))
    assert len(set(minibatch(100, 8, 0, 5))) == 8
    assert len(minibatch(4, 8, 0, 0)) == 4


def test_jsonl_source_split_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": i}) + "\n" for i in range(10)))
    train, heldout = load_splits(DataSection(source=str(path), prompt_field="question", heldout_size=3), seed=0)
    assert len(heldout) == 3 and len(train) == 7
    assert not set(train.prompts()) & set(heldout.prompts())
    assert train.columns()["answer"] == [int(p[1:]) for p in train.prompts()]
    with pytest.raises(EssaError, match="data.prompt_field"):
        load_splits(DataSection(source=str(path), prompt_field="prompt", heldout_size=3), seed=0)
    with pytest.raises(EssaError, match="not found"):
        load_splits(DataSection(source=str(tmp_path / "missing.jsonl")), seed=0)
    path.write_text('{"prompt": 1}\nnot json\n')
    with pytest.raises(EssaError, match=r"d.jsonl:2: not valid JSON"):
        load_splits(DataSection(source=str(path), heldout_size=1), seed=0)


def test_render_uses_the_chat_template_and_system_prompt(smollm2_dir):
    tokenizer = load_tokenizer(str(smollm2_dir))
    [text] = render(tokenizer, ["Hi"], DataSection(system_prompt="Be brief."))
    assert "Be brief." in text and text.rstrip().endswith("assistant")
    assert render(tokenizer, ["Hi"], DataSection(chat_template=False)) == ["Hi"]


def test_scorer_counts_failures_and_unknown_rewards_are_errors(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("import math\n"
                    "def odd(prompts, completions, **_):\n    return [1.0, None, math.nan, math.inf]\n"
                    "def short(prompts, completions, **_):\n    return [1.0]\n")
    scorer = Scorer.from_recipe(f"{path}:odd", [], {})
    scores, failures = scorer(["p"] * 4, ["c"] * 4, {})
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.0] and failures == 3
    scorer.close()
    wrong_length = Scorer.from_recipe(f"{path}:short", [], {})
    assert wrong_length(["p"] * 2, ["c"] * 2, {})[1] == 2
    wrong_length.close()
    with pytest.raises(EssaError, match="unknown reward"):
        Scorer.from_recipe("nope", [], {})


def test_json_csv_parquet_sources_and_column_mapping(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"question": [f"q{i}" for i in range(6)], "solution": [f"#### {i}" for i in range(6)]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(frame.to_json(orient="records"))
    for name in ("d.csv", "d.parquet", "d.json"):
        cfg = DataSection(source=str(tmp_path / name), prompt_field="question", heldout_size=2,
                          columns={"answer": "solution"})
        train, heldout = load_splits(cfg, seed=0)
        assert len(train) == 4 and len(heldout) == 2, name
        assert [f"#### {p[1:]}" for p in train.prompts()] == train.columns()["answer"], name


def test_hub_gsm8k_reads_the_shared_copy_with_a_separate_heldout_split():
    from essa.data import data_dirs

    if not any((d / "gsm8k" / "test.jsonl").is_file() for d in data_dirs()):
        pytest.skip("../shared/data is not beside the checkout")
    cfg = DataSection(source="openai/gsm8k", config="main", split="train", heldout_split="test",
                      prompt_field="question", train_size=100, heldout_size=20)
    train, heldout = load_splits(cfg, seed=0)
    assert len(train) == 100 and len(heldout) == 20
    assert all(a.split("####")[-1].strip() for a in train.columns()["answer"])
    assert not set(train.prompts()) & set(heldout.prompts())


def test_unreachable_hub_dataset_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    code = ("from essa.data import load_splits; from essa.recipe import DataSection\n"
            "from essa.errors import EssaError\n"
            "try:\n    load_splits(DataSection(source='essa-test/no-such-dataset'), 0)\n"
            "except EssaError as e:\n    print(e)\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.startswith("data.source: cannot load hub dataset 'essa-test/no-such-dataset'")
    assert "offline? download it once and point data.source at a local" in out and out.count("\n") == 1


def test_countdown_generator_source():
    train, heldout = load_splits(DataSection(source="countdown", train_size=10, heldout_size=3), seed=0)
    assert len(train) == 10 and len(heldout) == 3 and {"numbers", "target"} <= train.columns().keys()
