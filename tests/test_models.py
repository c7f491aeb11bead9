import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from essa.errors import EssaError
from essa.models import bundled_gguf, keep_backward, quantization_config, resolve_source


def test_gguf_file_and_alias_resolve_to_the_same_converted_directory(smollm2_dir):
    gguf = bundled_gguf("smollm2-135m-instruct")
    assert gguf.suffix == ".gguf" and gguf.is_file()
    assert Path(resolve_source(str(gguf))) == smollm2_dir
    assert (smollm2_dir / "config.json").is_file() and (smollm2_dir / "tokenizer.json").is_file()


def test_local_paths_that_do_not_exist_or_are_not_models(tmp_path):
    with pytest.raises(EssaError, match="local path './nope' not found"):
        resolve_source("./nope")
    with pytest.raises(EssaError, match="GGUF file"):
        resolve_source(str(tmp_path / "x.gguf"))
    with pytest.raises(EssaError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_unreachable_hub_model_is_one_line_and_exit_2(tiny_recipe):
    recipe = tiny_recipe(model={"name_or_path": "essa-test/does-not-exist"})
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "essa", "align", str(recipe), "--out", str(recipe.parent / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: model.name_or_path: cannot load 'essa-test/does-not-exist'")


CONVERT = "import sys; from essa.models import resolve_source; print(resolve_source(sys.argv[1]))"


def test_processes_racing_on_an_empty_cache_share_one_conversion(tmp_path):
    """Seeds started side by side on a fresh install: one converts, the other waits and uses its directory."""
    gguf = Path(shutil.copy(bundled_gguf("smollm2-135m-instruct"), tmp_path / "model.gguf"))
    env = os.environ | {"ESSA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(gguf)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dirs = {out.strip() for out, _ in outs}
    assert len(dirs) == 1
    target = Path(dirs.pop())
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert sum("converting model.gguf once" in err for _, err in outs) == 1
    assert sum("waiting for another process converting" in err for _, err in outs) == 1
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".tmp-")] == []
    # A reinstall rewrites the file with a new mtime and the same bytes: the conversion is reused.
    os.utime(gguf, (1, 1))
    again = subprocess.run([sys.executable, "-c", CONVERT, str(gguf)], capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode == 0 and Path(again.stdout.strip()) == target and "converting" not in again.stderr


def test_auto_dtype_is_bf16_for_4bit_models_on_a_cpu_that_multiplies_bf16():
    import torch
    from bitsandbytes.functional import has_avx512bf16

    from essa.models import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "nf4") == (torch.bfloat16 if has_avx512bf16() else torch.float32)
    assert resolve_dtype("auto", cpu, "none") == torch.float32  # unquantized: float32, as peft computes
    assert resolve_dtype("auto", cpu, "int8") == torch.float32
    assert resolve_dtype("float32", cpu, "nf4") == torch.float32  # an explicit dtype is kept
    assert resolve_dtype("auto", torch.device("cuda"), "none") == torch.bfloat16


def lora_gradients(model_dir, evaluate_first: bool, keep: bool) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 quantization_config=quantization_config("nf4", torch.float32))
    if keep:
        keep_backward(model)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.arange(3, 20).unsqueeze(0)
    if evaluate_first:  # what a held-out evaluation between training steps does
        with torch.no_grad():
            model.eval()(input_ids=ids)
    model.train()(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_a_4bit_model_still_trains_after_it_has_generated(tiny_model_dir):
    """On CPUs with AVX512-BF16 every gradient is None without keep_backward (bitsandbytes' repacked
    inference kernel has no backward); on others the check holds as well."""
    fresh = lora_gradients(tiny_model_dir, evaluate_first=False, keep=False)
    after = lora_gradients(tiny_model_dir, evaluate_first=True, keep=True)
    assert fresh and all(g is not None for g in fresh.values())
    for name, grad in fresh.items():
        assert after[name] is not None, name
        torch.testing.assert_close(after[name], grad)
