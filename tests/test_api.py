"""essa.train: a run from Python objects (a datasets.Dataset, TRL-style reward callables), the same run
as the command's, with its adapter exported."""

import json
import re
from pathlib import Path

import pytest
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM

import essa
from essa.errors import EssaError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["river", "lamp", "stone", "cloud", "bread", "violin", "garden", "engine", "letter", "mirror", "forest",
         "candle", "bridge", "anchor", "pencil", "window"]


def brief(completions, target, **kwargs):
    """TRL's signature: completions by name, each dataset column as a keyword argument (a list, one per row)."""
    return [1.0 if t in c.lower() else 0.5 if len(c.split()) <= 4 else 0.0 for c, t in zip(completions, target)]


def recipe(model_dir: Path) -> dict:
    return {"model": {"name_or_path": str(model_dir)}, "lora": {"rank": 2},
            "strategy": {"name": "es", "population": 4, "sigma": 0.5, "learning_rate": 0.2},
            "data": {"prompts_per_iteration": 4}, "generation": {"max_new_tokens": 6},
            "run": {"iterations": 2, "eval_every": 2}}


def rows(words):
    return [{"prompt": f"Say the word {w}.", "target": w} for w in words]


def test_train_runs_on_a_dataset_with_reward_callables_and_exports_the_adapter(tiny_model_dir, tmp_path):
    train, heldout = Dataset.from_list(rows(WORDS[:12])), Dataset.from_list(rows(WORDS[12:]))
    result = essa.train(recipe(tiny_model_dir), train_dataset=train, eval_dataset=heldout,
                        reward_funcs=[brief, lambda completions, **kw: [0.1] * len(completions)],
                        out=tmp_path / "run", overrides={"reward.weights": [1.0, 1.0]})
    assert result.run_dir == tmp_path / "run" and result.summary["iterations"] == 2
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1, 2] and all(m["reward_failures"] == 0 for m in metrics)
    # the held-out prompts are the eval_dataset's, all of them, scored by both rewards in the child
    heldout_rows = [json.loads(line) for line in (result.run_dir / "completions" / "iter-000000.jsonl").open()]
    assert sorted(r["prompt"] for r in heldout_rows) == sorted(r["prompt"] for r in rows(WORDS[12:]))
    assert all(r["reward"] >= 0.1 for r in heldout_rows)  # the lambda's 0.1 is in every row's sum
    assert len((result.run_dir / "inputs" / "train.jsonl").read_text().splitlines()) == 12
    saved = json.loads((result.run_dir / "recipe.json").read_text())
    assert [Path(n).suffix for n in saved["reward"]["name"]] == [".pkl", ".pkl"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(PeftModel.from_pretrained(base, str(result.adapter)), PeftModel)


def test_train_resumes_from_its_run_directory_alone(tiny_model_dir, tmp_path):
    data = Dataset.from_list(rows(WORDS))
    first = essa.train(recipe(tiny_model_dir), train_dataset=data, reward_funcs=[brief], out=tmp_path / "run",
                       overrides={"data.heldout_size": 4})
    # nothing passed again: the datasets and the pickled reward are in the run directory
    again = essa.train(recipe(tiny_model_dir), out=first.run_dir, resume=True, overrides={"run.iterations": 4})
    assert again.summary["iterations"] == 4
    assert len((first.run_dir / "metrics.jsonl").read_text().splitlines()) == 5


def test_bad_arguments_are_one_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(EssaError, match="train_dataset: expected a datasets.Dataset or a list of dicts, got int"):
        essa.train(recipe(tiny_model_dir), train_dataset=42, out=tmp_path / "a")
    with pytest.raises(EssaError, match=r"reward_funcs\[0\]: expected a callable or a reward name, got int"):
        essa.train(recipe(tiny_model_dir), reward_funcs=[3], out=tmp_path / "b")
    with pytest.raises(EssaError, match="run.iterationz: unknown key"):
        essa.train(recipe(tiny_model_dir), overrides={"run.iterationz": 2}, out=tmp_path / "c")
    with pytest.raises(EssaError, match="train_dataset: row 1 cannot be written as JSON"):
        essa.train(recipe(tiny_model_dir), train_dataset=[{"prompt": object()}], out=tmp_path / "d")


@pytest.mark.integration
def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## From Python.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert (tmp_path / result.run_dir / "metrics.jsonl").is_file()
    assert (tmp_path / result.adapter / "adapter_config.json").is_file()
    assert 0 <= result.summary["final_heldout_reward"] <= 1
