"""rewards/ifeval_repair.py against lm-eval's own IFEval checkers: every instruction it claims to
repair is followed afterwards, on generated IFEval-style prompts and an ordinary answer."""

import pytest

pytest.importorskip("lm_eval", reason="the IFEval checkers need the ifeval extra (lm-eval)")

from essa.rewards import ifeval  # noqa: E402
from essa.rewards.ifeval_repair import EDITS, finished, repair  # noqa: E402

ANSWER = ("Rivers carry water from the hills to the sea, and they shape the land as they go. Many towns grew "
          "beside them, because people needed water, fish and a way to travel. In spring the snow melts, the "
          "water rises, and some rivers flood their banks. Bridges, boats and mills all depend on them. "
          "Today we protect rivers, since clean water matters to everyone who lives near one. They are old")


def generated(n: int = 600) -> list[dict]:
    return ifeval.generate_examples(n, seed=3)


def satisfiable(example: dict) -> bool:
    """Generated prompts can ask for more than a rule can add (at least 400 words) or contradict
    themselves (paragraph 3 of 2): those are left to the reward."""
    for i, kw in zip(example["instruction_id_list"], example["kwargs"]):
        if i == "length_constraints:nth_paragraph_first_word" and kw["nth_paragraph"] > kw["num_paragraphs"]:
            return False
        if kw.get("relation") == "at least" and i.startswith("length_constraints"):
            return False
        if i == "length_constraints:number_sentences" and kw["num_sentences"] <= 1:
            return False  # "less than 1 sentence"
    return True


def test_every_repairable_instruction_is_followed_after_repair():
    checked: dict[str, int] = {}
    for example in generated():
        for i, kw in zip(example["instruction_id_list"], example["kwargs"]):
            one = {"prompt": example["prompt"], "instruction_id_list": [i], "kwargs": [kw]}
            if i not in EDITS or not satisfiable(one):
                continue
            [text] = repair([one["prompt"]], [ANSWER], [[i]], [[kw]])
            assert ifeval.verdicts(one["prompt"], text, [i], [kw]) == [True], (i, kw, text)
            checked[i] = checked.get(i, 0) + 1
    assert set(checked) == set(EDITS), f"not exercised: {set(EDITS) - set(checked)}"


def test_combined_instructions_are_mostly_all_followed():
    """Some pairs cannot both hold after rules that know nothing of each other (lowercase and "Section N"
    headers; paragraphs split by blank lines and sections): the reward keeps only what is followed."""
    done = [all(ifeval.verdicts(e["prompt"], repair([e["prompt"]], [ANSWER], [e["instruction_id_list"]],
                                                    [e["kwargs"]])[0], e["instruction_id_list"], e["kwargs"]))
            for e in generated() if len(e["instruction_id_list"]) > 1 and satisfiable(e)
            and all(i in EDITS for i in e["instruction_id_list"])]
    assert len(done) > 100 and sum(done) / len(done) > 0.85, (sum(done), len(done))


def test_what_no_rule_can_do_is_left_as_it_was():
    [text] = repair(["Answer in Bengali."], ["Rivers are long. They flow."], [["language:response_language"]],
                    [[{"language": "bn"}]])
    assert text == "Rivers are long. They flow."


def test_a_sentence_cut_off_by_the_token_limit_is_dropped():
    assert finished("Rivers are long. They flow to the sea. And then the") == "Rivers are long. They flow to the sea."
    assert finished("Only a fragment") == "Only a fragment"
    assert finished("One. ***\n\nTwo.") == "One. Two."
