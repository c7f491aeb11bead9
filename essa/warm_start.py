"""The warm start: a short supervised fine-tune that produces the LoRA adapter whose singular values
the search then evolves, as the ESSA paper starts from an SFT adapter rather than from nothing.

`warm_start.method` says where the fine-tune's targets come from:
- "reference": the dataset's own responses (the column `warm_start.response_field`, e.g. GSM8K's
  worked solutions);
- "rejection": where the data has none (format instructions, IFEval-style prompts), the base
  model's own samples: `samples_per_prompt` per prompt at `temperature`, scored by the recipe's
  reward, the best of each prompt kept when it scores above `min_reward` (rejection sampling);
  with `finished_only`, the best of those that ended before the token limit; with `repair`, each
  sample also as a task's own rule edits it to follow what the reward checks (IFEval's formats:
  `essa.rewards.ifeval_repair:repair`), scored like the others.
  The samples come from essa's own engine, the base model evaluated as a population of identical
  candidates with an empty search space, because it is the fastest generator this process has.

The fine-tune is TRL's `SFTTrainer` with a peft `LoraConfig` on the recipe's (quantized) base model,
QLoRA for 4-bit models, loss on the completions only. Its loss is computed here rather than by TRL
where the model's output layer is a plain projection: TRL's fused head scores the completion tokens
alone only on Triton devices, and on a CPU projects every position of the batch (prompt and padding
included) onto the vocabulary and adds entropy and top-1 statistics for its logs, which was 40% of
a quickstart fine-tune step (22 s -> 13 s for 5 steps, same loss; benchmarks/history/quality.md).

Why a run loads the model three times (the sampling, the fine-tune, then the search in essa/align.py),
each stage from the weights as stored: bitsandbytes repacks 4-bit weights for its CPU inference kernel
at the first forward in eval mode, and that kernel has no backward, so a model that has generated
cannot be fine-tuned (its gradients through the frozen layers are wrong); and the fine-tune's model
comes back with peft's LoRA layers injected and training state set, where the search needs the plain
base under its own per-row terms. A load of the bundled model takes 2–3 seconds.

Everything lands in <run>/warm_start/:
samples.jsonl (every sample with its reward and whether it was kept), sampled.json (what the samples
were made with, and their statistics), adapter/ (a PEFT adapter) and summary.json, written last, so a
resumed run whose warm start finished skips it. One interrupted in its fine-tune keeps its samples
when the recipe would sample the same ones (the same settings but those of the fine-tune), since the
sampling of a large warm start takes as long as the fine-tune; otherwise it starts again.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from essa.data import Dataset, render
from essa.engines.hf import HFEngine
from essa.engines.load import engine_for
from essa.engines.rows import prompt_lengths
from essa.errors import EssaError, RecipeError
from essa.evaluation import LocalEvaluator, Task
from essa.files import remove_tree, write_text
from essa.metrics import peak_memory_mb
from essa.models import load_model, load_tokenizer, resolve_device, resolve_source
from essa.progress import ChunkSteps, phase
from essa.recipe import Recipe, from_dict, to_dict
from essa.reward_process import RewardFailure
from essa.run_dir import ROUND_SAMPLES, SAMPLED, SAMPLES, WARM_ADAPTER, WARM_START_SUMMARY
from essa.scoring import Scorer
from essa.svd import SVDSpace, build_space

# the settings the samples do not depend on
FINE_TUNE = ("epochs", "learning_rate", "batch_size", "pass_tokens", "max_length", "rounds")
BASE = SVDSpace([], 1.0)  # no adapted modules: every candidate is the base model


def enabled(recipe: Recipe) -> bool:
    return recipe.warm_start.method != "none"


def prompts_for(recipe: Recipe, train: Dataset, round_: int = 1) -> Dataset:
    """A round's prompts: `warm_start.prompts` of the training split, a seeded choice, fresh each round."""
    rng = np.random.default_rng([recipe.run.seed, 0x5F7] + ([round_] if round_ > 1 else []))
    return train.subset(np.sort(rng.choice(len(train), min(recipe.warm_start.prompts, len(train)), replace=False)))


def engine(model, tokenizer, recipe: Recipe, temperature: float = 0.0, space: SVDSpace = BASE) -> HFEngine:
    return engine_for(model, tokenizer, space, recipe.generation, temperature, recipe.run.seed)


def adapter_space(model, recipe: Recipe, adapter: Path) -> SVDSpace:
    """The adapter as a space whose center (no offset) is the adapter itself: the engine then generates
    from base + adapter, as the search does."""
    lora = recipe.lora
    return build_space(model, lora.rank, lora.alpha, lora.target_modules, str(adapter), 1.0)


def heldout_reward(model, tokenizer, recipe: Recipe, heldout: Dataset, scorer: Scorer, console: Console,
                   space: SVDSpace = BASE) -> float:
    """The held-out reward (greedy) of the base model, or of base + adapter when `space` is an adapter's."""
    evaluator = LocalEvaluator(engine(model, tokenizer, recipe, space=space), scorer)
    try:
        with ChunkSteps(console, "held-out chunks", bar=False) as progress:
            evaluation = evaluator.evaluate(np.zeros((1, space.dim)), Task.of(tokenizer, heldout, recipe.data),
                                            on_chunk=progress, on_rows=progress.rows)
    finally:
        evaluator.close()
    return float(evaluation.scores.mean())


def best_of_k(model, tokenizer, recipe: Recipe, data: Dataset, scorer: Scorer, console: Console,
              space: SVDSpace = BASE) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample k completions per prompt (from the base model, or base + adapter when `space` is an
    adapter's), score them, keep each prompt's best above `min_reward`."""
    cfg = recipe.warm_start
    task = Task.of(tokenizer, data, recipe.data)
    evaluator = LocalEvaluator(engine(model, tokenizer, recipe, cfg.temperature, space), scorer)
    try:
        with ChunkSteps(console, "warm start samples", bar=False) as progress:
            evaluation = evaluator.evaluate(np.zeros((cfg.samples_per_prompt, space.dim)), task, keep_texts=True,
                                            on_chunk=progress, on_rows=progress.rows)
    finally:
        evaluator.close()
    scores, texts, k = evaluation.scores, evaluation.completions, cfg.samples_per_prompt
    finished = finished_before_limit(tokenizer, texts, recipe.generation.max_new_tokens)
    stats = {"sample_reward": float(scores.mean()), "finished_fraction": float(finished.mean()),
             "reward_failures": evaluation.failures, "seconds_sampling": evaluation.seconds}
    if cfg.repair:  # the repaired samples join the sampled ones, after them: an unedited sample wins a tie
        start = time.perf_counter()
        fixed, stats["repair_failures"] = repaired(scorer, cfg.repair, task, texts)
        scored = [scorer(task.prompts, row, task.columns) for row in fixed]
        fixed_scores = np.array([s for s, _ in scored])
        stats |= {"repaired_reward": float(fixed_scores.mean()), "seconds_repair": time.perf_counter() - start}
        stats["reward_failures"] += sum(f for _, f in scored)
        scores, texts = np.concatenate([scores, fixed_scores]), texts + fixed
        finished = np.concatenate([finished, finished])
    eligible = np.where(finished | (not cfg.finished_only), scores, -np.inf)
    best = eligible.argmax(0)  # the first of equal bests
    rows = [{"prompt": task.prompts[j], "rendered": task.rendered[j], "sample": i % k, "repaired": i >= k,
             "completion": texts[i][j], "reward": float(scores[i, j]), "finished": bool(finished[i, j]),
             "kept": bool(i == best[j] and eligible[i, j] > cfg.min_reward)}
            for j in range(len(task.prompts)) for i in range(len(scores))]
    stats["best_of_k_reward"] = float(scores.max(0).mean())
    return rows, stats


def repaired(scorer: Scorer, spec: str, task: Task, texts: list[list[str]]) -> tuple[list[list[str]], int]:
    """[candidate][prompt]: each sample as the function `spec` (`warm_start.repair`) edits it, called in the
    reward's child process, as the reward is, since both read model output; and how many rows stayed as
    sampled because their repair failed."""
    fixed = [repair_rows(scorer, spec, task, row, list(range(len(row)))) for row in texts]
    return ([[text if edit is None else edit for edit, text in zip(edits, row)] for edits, row in zip(fixed, texts)],
            sum(edit is None for edits in fixed for edit in edits))


def repair_rows(scorer: Scorer, spec: str, task: Task, texts: list[str], rows: list[int]) -> list[str | None]:
    """The repaired text of each of `rows`, None where it failed: all in one call, and when that fails, each
    row on its own (one hostile completion costs only its own repair)."""
    prompts, columns = task.rows(tuple(rows))
    try:
        values = scorer.process.call(spec, prompts, [texts[j] for j in rows], columns, {})
        if len(values) == len(rows):
            return [v if isinstance(v, str) else None for v in values]
    except RewardFailure:
        pass
    return [None] if len(rows) == 1 else [v for j in rows for v in repair_rows(scorer, spec, task, texts, [j])]


def finished_before_limit(tokenizer, texts: list[list[str]], max_new_tokens: int) -> np.ndarray:
    """[candidate, prompt]: whether each sample ended (a stop token) before the token limit. The engine
    returns text, not tokens, so the tokens are counted again (one batched call); re-encoding can differ
    by a token at the limit, and a sample that stopped exactly there counts as unfinished."""
    counts = prompt_lengths(tokenizer, [text for row in texts for text in row])
    return np.array(counts).reshape(len(texts), -1) < max_new_tokens


def references(recipe: Recipe, data: Dataset, tokenizer) -> list[dict[str, Any]]:
    """The dataset's own responses as targets; rows without one are left out."""
    field = recipe.warm_start.response_field
    rendered = render(tokenizer, data.prompts(), recipe.data)
    return [{"prompt": row[data.prompt_field], "rendered": text, "completion": str(row[field]), "kept": True}
            for row, text in zip(data.rows, rendered) if row.get(field) not in (None, "")]


# Config fields by which an output layer's logits are not the plain projection of the last hidden state;
# with any of them set, TRL's own loss, which applies them, is used.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "lm_head_multiplier")


def plain_head(model) -> bool:
    config = model.config.get_text_config()
    return all(getattr(config, name, None) is None for name in LOGIT_TRANSFORMS)


def completion_loss(model, inputs: dict[str, Any], num_items_in_batch: Any = None):
    """Mean cross-entropy of the completion tokens (labels other than -100), with the vocabulary projection
    of those positions only: the same loss as TRL's, at a fraction of its cost on a CPU. Summed over this
    micro-batch and divided by the optimizer step's completion tokens (`num_items_in_batch`, all its
    micro-batches'; the trainer then leaves it unscaled), so the micro-batches' gradients add up to
    the whole batch's; without it, this micro-batch's mean."""
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                      position_ids=inputs.get("position_ids"), use_cache=False).last_hidden_state
    labels = inputs["labels"][:, 1:]
    scored = labels != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][scored]).float()
    items = scored.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return F.cross_entropy(logits, labels[scored], reduction="sum") / items


def trainer_class():
    """SFTTrainer, with `completion_loss` where the model allows it (the module docstring says why)."""
    from trl import SFTTrainer

    class CompletionLossTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not plain_head(model):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return completion_loss(model, inputs, num_items_in_batch)

    return CompletionLossTrainer


def release_memory() -> None:
    """Free what a finished stage left and hand the freed pages back to the system. torch's CPU tensors
    come from malloc, and glibc keeps freed memory in its arenas, so each stage's model load (the next
    model is read in full precision, then quantized) would otherwise peak on top of the last stage's
    high-water mark: the quickstart's search loaded its model at 3.2 GB after a warm start whose own
    load peaked at 2.4 GB. Elsewhere than glibc, only the collection."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def micro_batch(batch_size: int, longest: int, pass_tokens: int) -> int:
    """Examples per forward and backward pass: the largest divisor of `batch_size` whose examples of up
    to `longest` tokens fit in `pass_tokens` (at least 1), so that an optimizer step's passes add up to
    exactly `batch_size` examples. The activations kept for the backward pass grow with a pass's tokens
    (IFEval's examples of up to 510 tokens, 135M model: 5.3 GB in passes of 8, 3.5 GB in passes of 2);
    the result does not (up to rounding). Short examples stay in one pass: each pass dequantizes
    every 4-bit weight again (passes of 2 cost the quickstart's fine-tune a fifth more time)."""
    fits = max(1, pass_tokens // max(longest, 1))
    return max(d for d in range(1, min(batch_size, fits) + 1) if batch_size % d == 0)


def fine_tune(model, tokenizer, recipe: Recipe, rows: list[dict[str, Any]], out: Path, console: Console,
              start: Path | None = None) -> dict[str, float]:
    """TRL's SFTTrainer on the prompt/completion pairs, with a fresh LoRA or the adapter at `start`
    trained on; the adapter goes to `out`."""
    from datasets import Dataset as HFDataset
    from peft import LoraConfig, PeftModel
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig

    cfg, lora = recipe.warm_start, recipe.lora
    steps = math.ceil(cfg.epochs * math.ceil(len(rows) / cfg.batch_size))

    class Lines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                console.print(f"warm start fine-tune {state.global_step}/{steps}  loss {logs['loss']:.4f}  "
                              f"elapsed {time.perf_counter() - began:.0f} s", highlight=False)

    cuda = resolve_device(recipe.model.device).type == "cuda"
    texts = [r["rendered"] + r["completion"] for r in rows]
    longest = min(cfg.max_length, 1 + max(prompt_lengths(tokenizer, texts)))  # + 1: TRL appends EOS
    micro = micro_batch(cfg.batch_size, longest, cfg.pass_tokens)
    args = SFTConfig(output_dir=str(out.parent / "trainer"), num_train_epochs=cfg.epochs,
                     per_device_train_batch_size=micro, gradient_accumulation_steps=cfg.batch_size // micro,
                     learning_rate=cfg.learning_rate,
                     lr_scheduler_type="constant", max_length=cfg.max_length, seed=recipe.run.seed,
                     # Memory matters for multi-billion models on a GPU; on a CPU the models are small and
                     # recomputing activations would only cost time.
                     gradient_checkpointing=cuda, bf16=cuda, use_cpu=not cuda, save_strategy="no",
                     logging_steps=1, report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=lora.target_modules,
                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    if start is not None:
        model, peft_config = PeftModel.from_pretrained(model, str(start), is_trainable=True), None
    data = HFDataset.from_list([{"prompt": r["rendered"], "completion": r["completion"]} for r in rows])
    began = time.perf_counter()
    trainer = trainer_class()(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                              peft_config=peft_config, callbacks=[Lines()])
    trainer.remove_callback(PrinterCallback)  # its raw dicts repeat what Lines says
    result = trainer.train()
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)  # a round's adapter replaces the one it was trained from
    os.replace(tmp, out)
    shutil.rmtree(out.parent / "trainer", ignore_errors=True)
    return {"sft_steps": trainer.state.global_step, "sft_train_loss": float(result.training_loss),
            "sft_examples_per_pass": micro, "seconds_fine_tune": time.perf_counter() - began}


def sampling_settings(recipe: Recipe) -> dict[str, Any]:
    """Everything a warm start's samples (and the base model's held-out reward) depend on."""
    raw = to_dict(recipe)
    settings = {name: raw[name] for name in ("model", "data", "reward", "generation")}
    settings["warm_start"] = {k: v for k, v in raw["warm_start"].items() if k not in FINE_TUNE}
    return json.loads(json.dumps(settings | {"seed": recipe.run.seed}))  # tuples as lists, as read back


def earlier_samples(root: Path, recipe: Recipe) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """An interrupted warm start's samples and their statistics, when this recipe would make the same."""
    try:
        sampled = json.loads((root / SAMPLED).read_text())
        if sampled["settings"] != sampling_settings(recipe):
            return None
        return [json.loads(line) for line in (root / SAMPLES).read_text().splitlines()], sampled["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_samples(recipe: Recipe, train: Dataset, heldout: Dataset, scorer: Scorer, root: Path,
                 console: Console) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The base model's held-out reward, then the fine-tune's targets, written to `root`."""
    start = time.perf_counter()
    with phase(console, "warm start: loading the model"):
        model, tokenizer = load_model(recipe.model)
    summary: dict[str, Any] = {"method": recipe.warm_start.method}
    with phase(console, f"warm start: evaluating the base model on {len(heldout)} held-out prompts"):
        summary["base_heldout_reward"] = heldout_reward(model, tokenizer, recipe, heldout, scorer, console)
    console.print(f"held-out reward of the base model: {summary['base_heldout_reward']:.4f}")
    data = prompts_for(recipe, train)
    if recipe.warm_start.method == "rejection":
        k = recipe.warm_start.samples_per_prompt
        with phase(console, f"warm start: sampling {k} completions for each of {len(data)} prompts"):
            samples, stats = best_of_k(model, tokenizer, recipe, data, scorer, console)
        summary |= stats
        repairs = f", repaired {stats['repaired_reward']:.4f}" if "repaired_reward" in stats else ""
        console.print(f"warm start samples: mean reward {stats['sample_reward']:.4f}{repairs}, best of {k} "
                      f"{stats['best_of_k_reward']:.4f}")
    else:
        samples = references(recipe, data, tokenizer)
    summary |= {"seconds_samples": time.perf_counter() - start, "peak_memory_mb": peak_memory_mb()}
    write_text(root / SAMPLES, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
    write_text(root / SAMPLED, json.dumps({"settings": sampling_settings(recipe), "summary": summary}, indent=1))
    return samples, summary


def run(recipe: Recipe, train: Dataset, heldout: Dataset, scorer: Scorer, run_dir: Path, resume: bool,
        console: Console) -> tuple[Path, dict[str, Any]]:
    """The warm start's adapter directory and summary, made now or, on a resume, before."""
    done = run_dir / WARM_START_SUMMARY
    root = done.parent
    adapter = root / WARM_ADAPTER
    if resume and done.is_file():
        console.print(f"warm start: done before, using {adapter}")
        return adapter, json.loads(done.read_text())
    check_max_length(recipe, train)
    earlier = earlier_samples(root, recipe) if resume else None
    if earlier:
        samples, summary = earlier
        console.print(f"warm start: using the {len(samples)} samples made before ({root / SAMPLES})")
        if adapter.exists():
            remove_tree(adapter)
    else:
        if root.exists():
            remove_tree(root)
        root.mkdir(parents=True)
        # The fine-tune gets a model of its own: bitsandbytes repacks 4-bit weights for its CPU inference
        # kernel at the first forward in eval mode, and that kernel has no backward, so gradients through
        # the frozen layers of a model that has generated are wrong (torch warns "an autograd kernel was
        # not registered"). The sampling's model is gone when make_samples returns.
        samples, summary = make_samples(recipe, train, heldout, scorer, root, console)
        release_memory()
    start = time.perf_counter()
    kept = [r for r in samples if r["kept"]]
    if not kept:
        raise nothing_to_learn(recipe, root / SAMPLES)
    summary = summary | {"examples": len(kept)}
    with phase(console, f"warm start: fine-tuning a rank-{recipe.lora.rank} LoRA on {len(kept)} examples"):
        model, tokenizer = load_model(recipe.model)
        summary |= fine_tune(model.train(), tokenizer, recipe, kept, adapter, console)
    del model
    release_memory()
    if recipe.warm_start.rounds > 1:
        summary["rounds"] = [further_round(recipe, train, heldout, scorer, root, adapter, round_, console)
                             for round_ in range(2, recipe.warm_start.rounds + 1)]
    summary |= {"seconds": summary["seconds_samples"] + time.perf_counter() - start,
                "peak_memory_mb": max(summary["peak_memory_mb"], peak_memory_mb())}
    write_text(done, json.dumps(summary, indent=1))
    return adapter, summary


def further_round(recipe: Recipe, train: Dataset, heldout: Dataset, scorer: Scorer, root: Path, adapter: Path,
                  round_: int, console: Console) -> dict[str, Any]:
    """Expert iteration, one round: the held-out reward of the adapter so far, then its own samples on
    fresh prompts, each prompt's best kept, and the same adapter trained on (the fine-tune continued,
    where the search would start instead)."""
    start = time.perf_counter()
    with phase(console, f"warm start round {round_}: loading the model with the adapter so far"):
        model, tokenizer = load_model(recipe.model)
        space = adapter_space(model, recipe, adapter)
    record: dict[str, Any] = {"round": round_, "heldout_reward_before": heldout_reward(
        model, tokenizer, recipe, heldout, scorer, console, space)}
    k = recipe.warm_start.samples_per_prompt
    with phase(console, f"warm start round {round_}: sampling {k} completions for each of "
                        f"{recipe.warm_start.prompts} fresh prompts from the adapter"):
        samples, stats = best_of_k(model, tokenizer, recipe, prompts_for(recipe, train, round_), scorer, console,
                                   space)
    del model, space  # the fine-tune gets a model of its own, as in the first round (run says why)
    release_memory()
    path = root / ROUND_SAMPLES.format(round_)
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
    kept = [r for r in samples if r["kept"]]
    if not kept:
        raise nothing_to_learn(recipe, path)
    console.print(f"warm start round {round_}: held-out reward of the adapter so far "
                  f"{record['heldout_reward_before']:.4f}; samples {stats['sample_reward']:.4f}, best of {k} "
                  f"{stats['best_of_k_reward']:.4f}")
    with phase(console, f"warm start round {round_}: fine-tuning the adapter on {len(kept)} examples"):
        model, tokenizer = load_model(recipe.model)
        record |= stats | {"examples": len(kept)} | fine_tune(model.train(), tokenizer, recipe, kept, adapter,
                                                              console, start=adapter)
    del model
    release_memory()
    return record | {"seconds": time.perf_counter() - start, "peak_memory_mb": peak_memory_mb()}


def check_max_length(recipe: Recipe, train: Dataset) -> None:
    """`warm_start.max_length` must leave completion tokens to learn from: the fine-tune cuts each example
    at its end, so a limit at or below every prompt's length leaves none (TRL then fails deep inside its
    sampler). The tokenizer alone tells, so this is said before any model loads."""
    tokenizer = load_tokenizer(resolve_source(recipe.model.name_or_path))
    lengths = prompt_lengths(tokenizer, render(tokenizer, prompts_for(recipe, train).prompts(), recipe.data))
    limit = recipe.warm_start.max_length
    if limit <= min(lengths):
        raise RecipeError(recipe.source, "warm_start.max_length",
                          f"{limit} tokens, but the fine-tune's {len(lengths)} prompts have {min(lengths)} to "
                          f"{max(lengths)} tokens, so every example would be cut before its completion and nothing "
                          f"is left to learn; set it above {max(lengths)} (default 1024)")


def nothing_to_learn(recipe: Recipe, samples: Path) -> EssaError:
    cfg = recipe.warm_start
    if cfg.method == "rejection":
        which = "finished sample" if cfg.finished_only else "sample"
        return EssaError(f"warm_start: no {which} scored above warm_start.min_reward = {cfg.min_reward:g} "
                         f"(see {samples}); lower min_reward, raise samples_per_prompt or temperature"
                         + (" or generation.max_new_tokens" if cfg.finished_only else ""))
    return EssaError(f"warm_start.response_field: no training row has a non-empty {cfg.response_field!r}")


def searched(recipe: Recipe, adapter: Path) -> Recipe:
    """The recipe the search runs after a warm start: its adapter as `lora.adapter`, the warm start done
    (what a Ray worker or a resumed engine is built from)."""
    raw = recipe.written
    return from_dict(raw | {"lora": raw.get("lora", {}) | {"adapter": str(adapter)}, "warm_start": {"method": "none"}},
                     recipe.source)
