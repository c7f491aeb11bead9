import time
from fractions import Fraction

import numpy as np
import pytest
from essa.rewards import countdown, gsm8k

from essa.errors import EssaError
from essa.reward_process import load_function
from essa.scoring import Scorer

REFERENCE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"


@pytest.mark.parametrize("completion, strict, flexible", [
    ("She sold 72 clips.\n#### 72", "72", "72"),
    ("#### 1,200", "1,200", "1,200"),
    ("The total is $1,234.", None, "$1,234."),
    ("First 12, then 30, so the answer is 42", None, "42"),
    ("So we get \\boxed{\\frac{1}{2}} and 7", None, "\\frac{1}{2}"),
    ("no number here", None, None),
    ("#### 5 and later #### 6", "5", "5"),
])
def test_extraction_follows_lm_eval_filters(completion, strict, flexible):
    assert gsm8k.extract(completion, "strict") == strict
    assert gsm8k.extract(completion, "flexible") == flexible


def test_normalization_and_reward():
    assert gsm8k.normalize("$1,234.") == "1234"
    assert gsm8k.normalize(REFERENCE) == "72"
    completions = ["The answer is 72.", "#### 72", "\\boxed{72}", "It is 71", "$72"]
    assert gsm8k.reward([""] * 5, completions, [REFERENCE] * 5) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert gsm8k.reward([""] * 2, ["The answer is 72.", "#### 72"], [REFERENCE] * 2, mode="strict") == [0.0, 1.0]


def test_gsm8k_reward_on_real_references():
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip("../shared/data is not beside the checkout")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:200]]
    answers = [r["answer"] for r in rows]
    # The reference solution itself must score 1 under both filters.
    assert gsm8k.reward([""] * 200, answers, answers, mode="strict") == [1.0] * 200
    assert gsm8k.reward([""] * 200, answers, answers) == [1.0] * 200


@pytest.mark.parametrize("text, value, used", [
    ("(25 - 5) * 4 / 2", Fraction(40), [25, 5, 4, 2]),
    ("3 × 4 − 2 ÷ 2", Fraction(11), [3, 4, 2, 2]),
])
def test_countdown_evaluates_arithmetic_exactly(text, value, used):
    assert countdown.evaluate(text) == (value, used)


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('touch /tmp/pwned')",
    "9**9**9**9",
    "2 ** 100000000",
    "1 / 0",
    "(1 - 1) / (2 - 2)",
    "-3 + 5",
    "open('/etc/passwd').read()",
    "[x for x in range(10**9)]",
    "1" * 500,
    "(" * 150 + "1" + ")" * 150,
    "lambda: 0",
    "1e308 * 10",
])
def test_countdown_rejects_hostile_strings_without_running_them(hostile):
    start = time.perf_counter()
    with pytest.raises(countdown.Invalid):
        countdown.evaluate(hostile)
    assert time.perf_counter() - start < 1.0
    assert countdown.score(f"<answer>{hostile}</answer>", [1, 2, 3], 6) == 0.0


def test_countdown_scores():
    numbers, target = [25, 5, 4, 2], 40
    assert countdown.score("thinking...\n<answer>(25 - 5) * 4 / 2</answer>", numbers, target) == 1.0
    assert countdown.score("<answer>(25 - 5) * 4 / 2 = 40</answer>", numbers, target) == 1.0
    assert countdown.score("<answer>25 + 5 + 4 + 2</answer>", numbers, target) == 0.1
    assert countdown.score("<answer>(25 - 5) * 2</answer>", numbers, target) == 0.0  # not every number used
    assert countdown.score("<answer>(25 - 5) * 4 / 2 + 2</answer>", numbers, target) == 0.0  # 2 used twice
    assert countdown.score("(25 - 5) * 4 / 2", numbers, target) == 1.0  # last line without tags


def test_countdown_generator_makes_solvable_problems():
    examples = countdown.generate_examples(20, seed=0)
    assert examples == countdown.generate_examples(20, seed=0)
    for ex in examples:
        assert len(ex["numbers"]) == 4 and ex["target"] > 0 and str(ex["target"]) in ex["prompt"]


def test_custom_rewards_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    assert load_function(f"{tmp_path / 'my_reward.py'}:length")(["p"], ["abc"]) == [3.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_function("my_reward:length")(["p"], ["ab"]) == [2.0]
    # Through a scorer the reward is imported and called in the reward process, never in essa's own.
    scorer = Scorer.from_recipe("my_reward:length", [], {})
    assert scorer(["p"], ["abcd"], {})[0].tolist() == [4.0]
    scorer.close()
    with pytest.raises(EssaError, match="has no function 'nope'"):
        Scorer.from_recipe("my_reward:nope", [], {})
    with pytest.raises(EssaError, match="not found"):
        Scorer.from_recipe("missing.py:f", [], {})
    (tmp_path / "broken.py").write_text("raise RuntimeError('bad module')\n")
    with pytest.raises(EssaError, match="cannot load .*RuntimeError: bad module"):
        Scorer.from_recipe(f"{tmp_path / 'broken.py'}:f", [], {})


def test_weighted_combination_kwargs_and_timeout(tmp_path):
    path = tmp_path / "combo.py"
    path.write_text("import time\n"
                    "def one(prompts, completions, **_):\n    return [1.0] * len(completions)\n"
                    "def scaled(prompts, completions, factor=1.0, **_):\n    return [factor] * len(completions)\n"
                    "def hangs(prompts, completions, **_):\n    time.sleep(30)\n    return [1.0] * len(completions)\n")
    scorer = Scorer.from_recipe([f"{path}:one", f"{path}:scaled"], [1.0, 0.5], {"factor": 4.0})
    scores, failures = scorer(["p", "q"], ["a", "b"], {})
    assert scores.tolist() == [3.0, 3.0] and failures == 0
    scorer.close()

    # timeout_s also bounds the import check at from_recipe; 0.5 s was too short on a slow CI machine
    slow = Scorer.from_recipe(f"{path}:hangs", [], {}, timeout_s=2.0)
    start = time.perf_counter()
    scores, failures = slow(["p"], ["a"], {})
    assert time.perf_counter() - start < 8 and failures == 1 and np.array_equal(scores, [0.0])
    assert slow(["p"], ["a"], {})[1] == 1  # still guarded after a timeout (a fresh reward process)
    slow.close()
    with pytest.raises(EssaError, match="2 weights for 1 rewards"):
        Scorer.from_recipe("gsm8k", [1.0, 2.0], {}, 1.0)


def test_essa_score_writes_one_row_per_input_with_its_reward(tmp_path, capsys):
    import json

    from essa.cli import main

    rows = [{"prompt": "q", "response": "so #### 72", "answer": REFERENCE},
            {"prompt": "q", "response": "I think 5", "answer": REFERENCE}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "--reward", "gsm8k", "--reward-kwargs", '{"mode": "strict"}', "--input", str(source),
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in out] == [1.0, 0.0] and out[0]["answer"] == REFERENCE
    assert "reward_mean: 0.5000" in capsys.readouterr().out
    assert main(["score", "--reward", "gsm8k", "--reward-kwargs", "{bad", "--input", str(source),
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    source.write_text('{"prompt": "q"}\n')
    assert main(["score", "--reward", "gsm8k", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "needs fields 'prompt' and 'response'" in capsys.readouterr().err


def test_math_answers_are_verified_symbolically():
    from essa.rewards import math_answers

    completions = ["So the result is $\\boxed{\\frac{1}{2}}$.", "The answer is \\boxed{0.5}", "\\boxed{2}",
                   "no answer", "\\boxed{\\sqrt{2}/2}"]
    answers = ["\\frac{1}{2}", "\\frac12", "3", "1", "\\frac{\\sqrt{2}}{2}"]
    assert math_answers.reward([""] * 5, completions, answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    # In essa's reward process it runs on the main thread, where math-verify's own timeouts work.
    scorer = Scorer.from_recipe("math", [], {})
    assert scorer([""], ["\\boxed{4}"], {"answer": ["2+2"]})[0].tolist() == [1.0]
    scorer.close()


def test_conciseness_rewards_correct_short_answers():
    from essa.rewards import conciseness

    completions = ["Paris", "The capital of France is Paris, a city on the Seine.", "Lyon", ""]
    scores = conciseness.reward([""] * 4, completions, ["Paris."] * 4)
    assert scores[0] == 1.0 and 0 < scores[1] < 0.2 and scores[2] == 0.0 and scores[3] == 0.0
