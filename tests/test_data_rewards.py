import json
import math

import numpy as np
import pytest

from essa.data import load_splits, minibatch, render
from essa.errors import EssaError
from essa.models import load_tokenizer
from essa.recipe import DataSection
from essa.scoring import Scorer, load_reward
from rewards import format_instructions as fi


@pytest.mark.parametrize("instruction, good, bad", [
    ({"id": "lowercase"}, "all lowercase here.", "Every Word Is Capitalized Here Now."),
    ({"id": "no_commas"}, "no commas at all", "one, two, three, four"),
    ({"id": "max_words", "kwargs": {"max_words": 3}}, "three short words", "this answer has far too many words in it"),
    ({"id": "end_phrase", "kwargs": {"end_phrase": "that is all."}}, "Cats nap. That is all.", "Cats nap."),
    ({"id": "quoted"}, '"a quoted answer"', "not quoted"),
])
def test_checkers_score_good_above_bad(instruction, good, bad):
    assert fi.score_response(good, [instruction]) == 1.0
    assert fi.score_response(bad, [instruction]) == 0.0


def test_checkers_are_graded():
    assert fi.score_response("Two Capitals", [{"id": "lowercase"}]) == pytest.approx(0.6)
    assert fi.score_response("x, y", [{"id": "no_commas"}]) == pytest.approx(2 / 3)
    end = [{"id": "end_phrase", "kwargs": {"end_phrase": "that is all."}}]
    assert fi.score_response("that is all. more", end) == 0.5
    two = [{"id": "lowercase"}, {"id": "quoted"}]
    assert fi.score_response("lower but unquoted", two) == 0.5


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
    with pytest.raises(EssaError, match="neither a built-in generator"):
        load_splits(DataSection(source=str(tmp_path / "missing.jsonl")), seed=0)
    path.write_text('{"prompt": 1}\nnot json\n')
    with pytest.raises(EssaError, match=r"d.jsonl:2: not valid JSON"):
        load_splits(DataSection(source=str(path), heldout_size=1), seed=0)


def test_render_uses_the_chat_template_and_system_prompt(smollm2_dir):
    tokenizer = load_tokenizer(str(smollm2_dir))
    [text] = render(tokenizer, ["Hi"], DataSection(system_prompt="Be brief."))
    assert "Be brief." in text and text.rstrip().endswith("assistant")
    assert render(tokenizer, ["Hi"], DataSection(chat_template=False)) == ["Hi"]


def test_scorer_counts_failures_and_unknown_rewards_are_errors():
    scorer = Scorer("t", [(lambda prompts, completions, **_: [1.0, None, math.nan, math.inf], 1.0)])
    scores, failures = scorer(["p"] * 4, ["c"] * 4, {})
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.0] and failures == 3
    wrong_length = Scorer("t", [(lambda prompts, completions, **_: [1.0], 1.0)])
    assert wrong_length(["p"] * 2, ["c"] * 2, {})[1] == 2
    with pytest.raises(EssaError, match="unknown reward"):
        load_reward("nope")
