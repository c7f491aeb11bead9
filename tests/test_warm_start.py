"""The warm start (essa/warm_start.py) on the tiny random model: sampled decoding, best-of-k targets,
TRL's fine-tune, the search space built from its adapter, resume, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from essa.adapter_files import read_peft_adapter
from essa.cli import main
from essa.engines import HFEngine
from essa.models import load_tokenizer
from essa.svd import SVDSpace
from tests.conftest import PROMPTS

# A reward that prefers longer answers, so the best of k samples is well defined on a random model.
REWARDS = """
def length(prompts, completions, **_):
    return [min(1.0, len(c) / 40) for c in completions]

def zero(prompts, completions, **_):
    return [0.0] * len(completions)

def pad(prompts, completions, **_):
    if len(completions) > 1:
        raise ValueError("one row at a time")  # so the batch call fails and each row is repaired alone
    return [None if len(completions[0]) % 2 == 0 else completions[0] + "!" * 40]
"""
WARM = {"method": "rejection", "prompts": 4, "samples_per_prompt": 3, "temperature": 1.0, "epochs": 1.0,
        "batch_size": 2, "learning_rate": 0.01}


def sample(model, tokenizer, temperature: float, seed: int) -> list[str]:
    engine = HFEngine(model, tokenizer, SVDSpace([], 1.0), max_new_tokens=8, batch_rows=16,
                      temperature=temperature, seed=seed)
    try:
        return engine.generate(torch.zeros(2, 0), PROMPTS).completions[0] + \
            engine.generate(torch.zeros(2, 0), PROMPTS).completions[1]
    finally:
        engine.close()


def test_sampling_is_seeded_and_temperature_zero_is_greedy(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    greedy = sample(model, tokenizer, 0.0, 0)
    assert sample(model, tokenizer, 0.0, 1) == greedy
    first, again, other = (sample(model, tokenizer, 1.5, seed) for seed in (0, 0, 1))
    assert first == again, "the same seed must give the same samples"
    assert first != other and first != greedy


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, tiny_model_dir):
    from tests.conftest import write_recipe

    tmp = tmp_path_factory.mktemp("warm")
    (tmp / "rewards.py").write_text(REWARDS)
    recipe = write_recipe(tmp / "recipe.toml", tiny_model_dir, warm_start=WARM,
                          reward={"name": f"{tmp / 'rewards.py'}:length"}, run={"iterations": 2, "eval_every": 1})
    assert main(["align", str(recipe), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_best_of_k_samples_are_the_targets(warm_run):
    rows = [json.loads(line) for line in (warm_run / "warm_start" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 3 and len({r["prompt"] for r in rows}) == 4
    for prompt in {r["prompt"] for r in rows}:
        mine = [r for r in rows if r["prompt"] == prompt]
        kept = [r for r in mine if r["kept"]]
        assert len(kept) == 1 and kept[0]["reward"] == max(r["reward"] for r in mine)
        assert kept[0]["rendered"].endswith("<|im_start|>assistant\n")  # what the engine's prompts look like
    assert len({r["completion"] for r in rows}) > 4, "k samples of a prompt should differ"
    assert not any(r["finished"] for r in rows), "the tiny random model runs to the token limit"


def test_finished_means_fewer_tokens_than_the_limit(tiny_model_dir):
    from essa.warm_start import finished_before_limit

    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = "The quick brown fox jumps over the lazy dog."
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert finished_before_limit(tokenizer, [[text, text * 3]], n + 1).tolist() == [[True, False]]
    assert finished_before_limit(tokenizer, [[text], [text]], n).tolist() == [[False], [False]]


def test_search_starts_from_the_fine_tuned_adapter(warm_run):
    config, weights = read_peft_adapter(warm_run / "warm_start" / "adapter")
    assert config["r"] == 2 and all(torch.count_nonzero(b) for _, b in weights.values()), "B must have trained"
    space = SVDSpace.load(warm_run / "space.safetensors")
    for module in space.modules:
        a, b = weights[module.name]
        torch.testing.assert_close(module.a.matrix(module.a.s).float(), a.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module.b.matrix(module.b.s).float(), b.float(), rtol=1e-4, atol=1e-5)
    summary = json.loads((warm_run / "summary.json").read_text())
    warm = summary["warm_start"]
    assert warm["method"] == "rejection" and warm["examples"] == 4 and warm["sft_steps"] == 2
    assert 0 <= warm["base_heldout_reward"] <= 1 and warm["best_of_k_reward"] >= warm["sample_reward"]
    assert warm["seconds"] > 0 and warm["peak_memory_mb"] > 0


def test_resume_keeps_a_finished_warm_start(warm_run, capsys):
    before = (warm_run / "warm_start" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["align", "--resume", "--out", str(warm_run), "--set", "run.iterations=3"]) == 0
    assert "warm start: done before" in capsys.readouterr().out
    assert (warm_run / "warm_start" / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert json.loads((warm_run / "summary.json").read_text())["iterations"] == 3


def interrupted_in_its_fine_tune(run: Path, to: Path) -> Path:
    """A copy of `run` as a run stopped during its warm start's fine-tune leaves it: samples, no adapter."""
    (to / "warm_start").mkdir(parents=True)
    for name in ("recipe.json", "warm_start/samples.jsonl", "warm_start/sampled.json"):
        (to / name).write_bytes((run / name).read_bytes())
    return to


def test_resume_after_the_sampling_keeps_the_samples(warm_run, tmp_path, capsys):
    run = interrupted_in_its_fine_tune(warm_run, tmp_path / "run")
    samples = (run / "warm_start" / "samples.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["align", "--resume", "--out", str(run), "--set", "warm_start.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "using the 12 samples made before" in out and "sampling 3 completions" not in out
    assert (run / "warm_start" / "samples.jsonl").read_bytes() == samples
    warm, before = (json.loads((r / "warm_start" / "summary.json").read_text()) for r in (run, warm_run))
    assert warm["sft_steps"] == 2 * before["sft_steps"]  # the fine-tune ran again, with the new epochs
    assert warm["base_heldout_reward"] == before["base_heldout_reward"]
    assert warm["seconds"] > warm["seconds_samples"] == before["seconds_samples"]


def test_resume_with_other_sampling_settings_samples_again(warm_run, tmp_path, capsys):
    run = interrupted_in_its_fine_tune(warm_run, tmp_path / "run")
    assert main(["align", "--resume", "--out", str(run), "--set", "warm_start.samples_per_prompt=2"]) == 0
    assert "sampling 2 completions" in capsys.readouterr().out
    assert len((run / "warm_start" / "samples.jsonl").read_text().splitlines()) == 4 * 2


def test_reference_responses_are_the_targets(tiny_recipe, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "answer": f"Answer {i}."}) + "\n"
                            for i in range(12)))
    (tmp_path / "rewards.py").write_text(REWARDS)
    recipe = tiny_recipe(data={"source": str(data), "train_size": 8, "heldout_size": 2, "prompts_per_iteration": 2},
                         reward={"name": f"{tmp_path / 'rewards.py'}:length"},
                         warm_start={"method": "reference", "prompts": 4, "epochs": 1.0, "batch_size": 4},
                         run={"iterations": 1, "eval_every": 1})
    assert main(["align", str(recipe), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "warm_start" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["kept"] and r["completion"] == f"Answer {r['prompt'][9:-1]}." for r in rows)


def test_recipe_check_checks_the_repair(tiny_recipe, capsys):
    recipe = tiny_recipe(warm_start=WARM | {"repair": "essa.rewards.ifeval_repair:nothing"})
    assert main(["recipe", "check", str(recipe)]) == 2
    assert "warm_start.repair: cannot load 'essa.rewards.ifeval_repair:nothing'" in capsys.readouterr().err


def test_repaired_samples_join_the_sampled_ones(tiny_recipe, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    recipe = tiny_recipe(warm_start=WARM | {"repair": f"{tmp_path / 'rewards.py'}:pad"},
                         reward={"name": f"{tmp_path / 'rewards.py'}:length"}, run={"iterations": 1, "eval_every": 1})
    assert main(["align", str(recipe), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "warm_start" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 3 * 2
    failed = 0
    for p in range(4):
        mine = rows[6 * p:6 * p + 6]
        sampled, fixed = mine[:3], mine[3:]
        assert [r["repaired"] for r in mine] == [False] * 3 + [True] * 3
        for s, f in zip(sampled, fixed):
            assert s["sample"] == f["sample"] and s["prompt"] == f["prompt"]
            if len(s["completion"]) % 2 == 0:  # the repair returned None: the sample stays as it was
                failed += 1
                assert f["completion"] == s["completion"]
            else:
                assert f["completion"] == s["completion"] + "!" * 40 and f["reward"] == 1.0
        best = max(r["reward"] for r in mine)
        assert [r["kept"] for r in mine] == [r is next(m for m in mine if m["reward"] == best) for r in mine]
    summary = json.loads((tmp_path / "run" / "warm_start" / "summary.json").read_text())
    assert summary["repair_failures"] == failed and summary["repaired_reward"] >= summary["sample_reward"]


@pytest.mark.parametrize("sections, message", [
    ({"warm_start": {"method": "rejection"}, "lora": {"adapter": "ADAPTER"}},
     "warm_start.method: 'rejection' produces the starting adapter, so it cannot be combined with lora.adapter"),
    ({"warm_start": {"method": "reference", "repair": "essa.rewards.ifeval_repair:repair"}},
     'warm_start.repair: repairs the base model\'s samples, so it needs warm_start.method = "rejection"'),
    ({"warm_start": {**WARM, "repair": "nowhere.py:fix"}}, "warm_start.repair: file 'nowhere.py' not found"),
    ({"warm_start": {**WARM, "repair": "essa.rewards.ifeval_repair:nothing"}},
     "warm_start.repair: cannot load 'essa.rewards.ifeval_repair:nothing'"),
    ({"warm_start": {**WARM, "max_length": 1}}, "warm_start.max_length: 1 tokens, but the fine-tune's 4 prompts"),
    ({"warm_start": {"method": "reference", "response_field": "solution"}},
     "warm_start.response_field: the training data has no column 'solution'"),
    ({"warm_start": {**WARM, "min_reward": 0.0}, "reward": {"name": "REWARDS:zero"}},
     "warm_start: no sample scored above warm_start.min_reward = 0"),
    # the tiny random model never stops within 8 tokens, so no sample finished
    ({"warm_start": {**WARM, "finished_only": True}},
     "warm_start: no finished sample scored above warm_start.min_reward = 0"),
])
def test_bad_warm_start_is_one_line(tiny_recipe, tmp_path, capsys, finished_adapter, sections, message):
    (tmp_path / "rewards.py").write_text(REWARDS)
    if "lora" in sections:
        sections["lora"] = {"adapter": str(finished_adapter)}
    if sections.get("reward", {}).get("name", "").startswith("REWARDS"):
        sections["reward"] = {"name": f"{tmp_path / 'rewards.py'}:zero"}
    assert main(["align", str(tiny_recipe(**sections)), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "run" / "checkpoints").glob("iter-*"))


@pytest.fixture
def finished_adapter(warm_run) -> Path:
    return warm_run / "warm_start" / "adapter"


def test_warm_start_prompts_are_a_seeded_choice(tiny_recipe):
    from essa.data import Dataset
    from essa.recipe import load
    from essa.warm_start import prompts_for

    train = Dataset([{"prompt": f"p{i}"} for i in range(50)], "prompt")
    recipe = load(tiny_recipe(warm_start={"prompts": 10}), [])
    first, again = prompts_for(recipe, train).prompts(), prompts_for(recipe, train).prompts()
    other = prompts_for(load(tiny_recipe(warm_start={"prompts": 10}, run={"seed": 1}), []), train).prompts()
    assert first == again and len(set(first)) == 10 and first != other
    assert np.array_equal(sorted(first, key=lambda p: int(p[1:])), first)


def test_report_shows_the_warm_start(warm_run):
    from essa.report import render

    warm = json.loads((warm_run / "warm_start" / "summary.json").read_text())
    page = render(warm_run)
    assert f"held-out reward of the base model {warm['base_heldout_reward']:.4f}" in page
    assert f"{warm['examples']} examples, {warm['sft_steps']} fine-tune steps" in page


def test_completion_loss_equals_trls(tiny_model_dir, tmp_path):
    """The loss the fine-tune optimizes is TRL's, value and gradient, on a real batch of its collator
    (float32, a padded batch of prompts and completions of different lengths)."""
    from datasets import Dataset as HFDataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from essa.warm_start import completion_loss, plain_head, trainer_class

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = HFDataset.from_list([{"prompt": p, "completion": c} for p, c in
                                zip(PROMPTS, ["Drops on the roof.", "Red, green and a very long blue.", "4"])])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, use_cpu=True, report_to=[])
    trainer = trainer_class()(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                              peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any(dim=1).all() and (batch["attention_mask"] == 0).any(), "prompt and padding"
    assert plain_head(trainer.model)
    grads = []
    for loss in (lambda: SFTTrainer.compute_loss(trainer, trainer.model, dict(batch)),
                 lambda: completion_loss(trainer.model, batch)):
        trainer.model.zero_grad()
        value = loss()
        value.backward()
        grads.append((value.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]))
    (trl_loss, trl_grads), (ours, our_grads) = grads
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    model.config.final_logit_softcapping = 30.0
    assert not plain_head(trainer.model), "a softcapped head is left to TRL, which applies it"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from Linux's /proc")
def test_release_memory_hands_freed_arena_pages_back():
    """400 MB of small tensors freed around every 16th one stay resident in glibc's arenas until released."""
    from essa.warm_start import release_memory

    def rss_mb() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    tensors = [torch.ones(16384) for _ in range(6400)]  # 64 KiB each: from malloc's arenas, not mmap
    kept = tensors[::16]
    del tensors
    before = rss_mb()
    release_memory()
    assert rss_mb() < before - 200
    assert len(kept) == 400


def test_micro_batch_divides_the_batch():
    from essa.warm_start import micro_batch

    assert [micro_batch(8, 100, t) for t in (50, 100, 200, 300, 400, 800, 10**6)] == [1, 1, 2, 2, 4, 8, 8]
    assert micro_batch(6, 100, 400) == 3 and micro_batch(7, 100, 200) == 1
    assert micro_batch(8, 118, 1024) == 8 and micro_batch(8, 510, 1024) == 2  # the quickstart's, IFEval's


def test_micro_batches_gradients_add_up_to_the_batchs(tiny_model_dir):
    """Each micro-batch's loss is its completion tokens' summed cross-entropy over the whole batch's
    count, so their gradients add up to the batch's (completions of different lengths: a mean per
    micro-batch would weigh their tokens differently)."""
    from peft import LoraConfig, get_peft_model

    from essa.warm_start import completion_loss

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = [tokenizer(p + c)["input_ids"] for p, c in zip(PROMPTS, ["Drops.", "Red, green and a very long blue.", "4"])]
    prompt_lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    width = max(map(len, ids))
    batch = {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
             "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])}
    batch["labels"] = torch.tensor([[-100] * n + row[n:] + [-100] * (width - len(row))
                                    for row, n in zip(ids, prompt_lengths)])
    trained = [p for p in model.parameters() if p.requires_grad]

    def gradients(parts: list[slice], items) -> list[torch.Tensor]:
        model.zero_grad()
        for part in parts:
            completion_loss(model, {k: v[part] for k, v in batch.items()}, items).backward()
        return [p.grad.clone() for p in trained]

    whole = gradients([slice(0, 3)], None)
    items = int((batch["labels"][:, 1:] != -100).sum())
    for mine, theirs in zip(gradients([slice(0, 1), slice(1, 3)], torch.tensor(items)), whole, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    means = gradients([slice(0, 1), slice(1, 3)], None)
    assert any(not torch.allclose(m, w) for m, w in zip(means, whole)), "the check can tell a mean per micro-batch"


def test_fine_tune_in_micro_batches_trains_what_one_batch_does(tiny_recipe, tiny_model_dir, tmp_path):
    """The fine-tune's passes of as many examples as fit in `pass_tokens` make the same optimizer steps
    (the trainer accumulates them) as passes of the whole batch, up to rounding."""
    from essa.models import load_model
    from essa.recipe import load
    from essa.warm_start import fine_tune

    completions = ["Drops on the roof.", "Red, green and a very long blue.", "4", "Yes.", "No", "A b c d e"]
    rows = [{"rendered": p, "completion": c} for p, c in zip(PROMPTS * 2, completions)]
    adapters = []
    for micro, pass_tokens in ((4, 10**6), (1, 1)):
        recipe = load(tiny_recipe(warm_start=WARM | {"batch_size": 4, "pass_tokens": pass_tokens, "epochs": 2.0}))
        model, tokenizer = load_model(recipe.model)
        summary = fine_tune(model.train(), tokenizer, recipe, rows, tmp_path / f"micro-{micro}", Console())
        assert summary["sft_examples_per_pass"] == micro
        assert summary["sft_steps"] == 4  # 2 epochs of 2 optimizer steps (4 + 2 examples), whatever the passes
        adapters.append(load_file(str(tmp_path / f"micro-{micro}" / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    for name, weight in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], weight, rtol=1e-4, atol=1e-5)  # Adam in float32


def test_further_rounds_sample_from_the_adapter_and_train_it_on(warm_run, tiny_recipe, tmp_path):
    """Round 1 is the one-round warm start itself: round 2 measures its adapter exactly as the search's
    iteration 0 did, then samples fresh prompts from it and trains the same adapter on."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    run = tmp_path / "rounds"
    recipe = tiny_recipe(warm_start=WARM | {"rounds": 3}, reward={"name": f"{tmp_path / 'rewards.py'}:length"},
                         run={"iterations": 1, "eval_every": 1})
    assert main(["align", str(recipe), "--out", str(run)]) == 0
    warm = json.loads((run / "summary.json").read_text())["warm_start"]
    one_round = json.loads((warm_run / "metrics.jsonl").read_text().splitlines()[0])["heldout_reward"]
    assert [r["round"] for r in warm["rounds"]] == [2, 3]
    assert warm["rounds"][0]["heldout_reward_before"] == one_round
    assert all(r["examples"] == 4 and r["sft_steps"] == 2 for r in warm["rounds"])
    fresh = [[r["prompt"] for r in map(json.loads, (run / "warm_start" / f"samples-round-{n:03d}.jsonl")
                                       .read_text().splitlines())] for n in (2, 3)]
    first = [r["prompt"] for r in map(json.loads, (run / "warm_start" / "samples.jsonl").read_text().splitlines())]
    assert set(fresh[0]) != set(first) and set(fresh[1]) != set(fresh[0])
    _, trained_on = read_peft_adapter(run / "warm_start" / "adapter")
    _, once = read_peft_adapter(warm_run / "warm_start" / "adapter")
    assert trained_on.keys() == once.keys()
    assert any(not torch.equal(trained_on[k][1], once[k][1]) for k in once)


def test_rounds_need_rejection(tiny_recipe, capsys):
    recipe = tiny_recipe(warm_start={"method": "reference", "rounds": 2})
    assert main(["recipe", "check", str(recipe)]) == 2
    assert "warm_start.rounds: each further round samples from the adapter so far" in capsys.readouterr().err
