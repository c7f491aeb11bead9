"""IFEval warm start with 6 epochs (issue 22), validation seeds 0-1: reuse the shipped runs' samples
(runs/ifeval-p512/seed-S, made at commit of 2026-12-04 evening with the same sampling settings) through
the new resume-after-sampling path. Writes runs/ife6/e6-sS/warm_start/{samples.jsonl,sampled.json}."""
import json, sys
from pathlib import Path
from essa import recipe as recipes
from essa.warm_start import sampling_settings, FINE_TUNE

for S in (0, 1):
    old = Path(f"/work/main/runs/ifeval-p512/seed-{S}")
    raw = recipes.apply_overrides(recipes.read_raw(Path("recipes/ifeval-smollm2.toml")), [f"run.seed={S}"], "x")
    r = recipes.from_dict(raw, "x")
    then = recipes.from_dict(recipes.read_saved(old / "recipe.json"), "y")
    new_s, old_s = sampling_settings(r), sampling_settings(then)
    assert new_s == old_s, [(k, new_s[k], old_s[k]) for k in new_s if new_s[k] != old_s[k]]
    summary = json.loads((old / "warm_start" / "summary.json").read_text())
    keep = {k: v for k, v in summary.items() if k not in ("examples", "sft_steps", "sft_train_loss", "seconds_fine_tune", "seconds")}
    keep["seconds_samples"] = summary["seconds"] - summary["seconds_fine_tune"]
    out = Path(f"/work/main/runs/ife6/e6-s{S}/warm_start"); out.mkdir(parents=True, exist_ok=True)
    (out / "samples.jsonl").write_bytes((old / "warm_start" / "samples.jsonl").read_bytes())
    (out / "sampled.json").write_text(json.dumps({"settings": new_s, "summary": keep}, indent=1))
    print(S, keep)
