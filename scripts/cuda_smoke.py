"""Run essa end to end on a CUDA GPU with a random-weight model built from a config (no download).

For each quantization (none, int8, nf4): `essa align` for a few iterations, export the adapter,
reload it with peft on the same quantized base, and compare next-token logits on held-out
prompts with the engine's center; likewise three population members against peft with each
member's adapter materialized.

    python scripts/cuda_smoke.py [--tokenizer DIR] [--hidden 1024 --layers 8]

DIR holds any transformers tokenizer with a chat template; the default is SmolLM2's, which
essa converts from the bundled model into ~/.cache/essa/gguf/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from random_models import build_random_model
from transformers import AutoModelForCausalLM

from essa.cli import main as essa
from essa.data import load_splits, render
from essa.engines import HFEngine
from essa.export import load_run
from essa.models import load_model, quantization_config
from essa.run_dir import METRICS_FILE


@torch.no_grad()
def next_token_agreement(model, engine: HFEngine, candidate: torch.Tensor, reference, batch) -> tuple[float, float]:
    """Engine vs reference on the same rows: share of positions with the same top-1 next token,
    and the largest logit difference relative to the logits' spread."""
    rows = len(batch["input_ids"])
    engine.lora.set_rows(candidate[None].float(), torch.zeros(rows, dtype=torch.long))
    ours = model(**batch).logits.float()
    theirs = reference(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    ours, theirs = ours[mask], theirs[mask]
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return top1, ((ours - theirs).abs().max() / theirs.std()).item()


def check(model_dir: Path, work: Path, quantization: str, iterations: int, dtype: str) -> dict:
    run, adapter = work / f"run-{quantization}", work / f"adapter-{quantization}"
    overrides = {"model.name_or_path": str(model_dir), "model.quantization": quantization,
                 "model.dtype": dtype, "run.iterations": iterations, "run.eval_every": iterations,
                 "data.heldout_size": 16, "generation.max_new_tokens": 32, "lora.rank": 8}
    argv = ["align", "--out", str(run)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    assert essa(argv) == 0
    assert essa(["export", str(run), "--adapter", str(adapter), "--center", "final"]) == 0
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]

    loaded = load_run(run, "final")
    recipe, space = loaded.recipe, loaded.space
    model, tokenizer = load_model(recipe.model)
    _, heldout = load_splits(recipe.data, recipe.run.seed)
    prompts = render(tokenizer, heldout.prompts(), recipe.data)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    engine = HFEngine(model, tokenizer, space, 32, 256)

    torch_dtype = getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, device_map={"": "cuda"},
                                                quantization_config=quantization_config(quantization, torch_dtype))
    exported = PeftModel.from_pretrained(base, str(adapter)).eval()
    center = next_token_agreement(model, engine, torch.as_tensor(loaded.center), exported, batch)

    members = torch.randn(3, space.dim, generator=torch.Generator().manual_seed(0)) * recipe.strategy.sigma
    member_scores = []
    for candidate in members:
        state = {f"base_model.model.{name}.lora_{part}.weight": w
                 for name, (a, b) in space.lora_weights(candidate).items() for part, w in (("A", a), ("B", b))}
        set_peft_model_state_dict(exported, state)
        member_scores.append(next_token_agreement(model, engine, candidate, exported, batch))
    engine.close()
    steps = rows[1:]
    return {"quantization": quantization,
            "seconds_per_iteration": sum(r["seconds_generate"] + r["seconds_score"] + r["seconds_update"]
                                         for r in steps) / len(steps),
            "tokens_per_s": sum(r["tokens_per_s"] for r in steps) / len(steps),
            "peak_memory_mb": rows[-1]["peak_memory_mb"],
            "exported_adapter_vs_center_top1": center[0], "exported_adapter_vs_center_max_rel_diff": center[1],
            "members_vs_peft_top1": min(t for t, _ in member_scores),
            "members_vs_peft_max_rel_diff": max(d for _, d in member_scores)}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory with a chat template (default: SmolLM2's)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the random model")
    parser.add_argument("--layers", type=int, default=8, help="layers of the random model")
    parser.add_argument("--iterations", type=int, default=3, help="essa align iterations per quantization")
    parser.add_argument("--quantizations", default="none,int8,nf4", help="comma-separated model.quantization values")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model and compute dtype (bfloat16 greedy outputs of a random model flip on ties)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this script needs a CUDA GPU"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_random_model("llama", work / "model", args.tokenizer, torch.float32,
                                   hidden=args.hidden, layers=args.layers)
        results = [check(model, work, q, args.iterations, args.dtype) for q in args.quantizations.split(",")]
    print(f"device: {torch.cuda.get_device_name()}, model: random Llama hidden {args.hidden} × {args.layers} layers, "
          f"{args.dtype}; top1 = share of prompt positions whose next token agrees, diff = max |Δlogit| / std(logits)")
    print(f"{'quantization':<13}{'s/iteration':>12}{'tokens/s':>10}{'peak MiB':>10}"
          f"{'export top1':>13}{'export diff':>13}{'member top1':>13}{'member diff':>13}")
    for r in results:
        print(f"{r['quantization']:<13}{r['seconds_per_iteration']:>12.2f}{r['tokens_per_s']:>10.0f}"
              f"{r['peak_memory_mb']:>10.0f}{r['exported_adapter_vs_center_top1']:>13.4f}"
              f"{r['exported_adapter_vs_center_max_rel_diff']:>13.2e}{r['members_vs_peft_top1']:>13.4f}"
              f"{r['members_vs_peft_max_rel_diff']:>13.2e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    cli()
