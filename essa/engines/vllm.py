"""vLLM engine: each candidate becomes a plain PEFT LoRA adapter, and the (candidate × prompt)
requests of up to `max_loras` candidates go to one `LLM.generate` call with a `LoRARequest` per row.

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
import time

import torch

from essa.adapter_files import write_peft_adapter
from essa.engines.rows import Chunking, Generation, OnRows, Rows, RowsOutput, generate
from essa.errors import EssaError
from essa.scratch import make_scratch
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


def memory_args(kv_cache_gb: float, gpu_memory_utilization: float, device: torch.device) -> dict:
    """vLLM's memory budget. On CPU the KV cache is sized explicitly: vLLM's share-of-RAM rule
    counts everything the process already holds, so a fixed size is the predictable choice."""
    if kv_cache_gb > 0 or device.type == "cpu":
        return {"kv_cache_memory_bytes": int((kv_cache_gb or 1.0) * 2**30)}
    return {"gpu_memory_utilization": gpu_memory_utilization}


class VLLMEngine:
    """Evaluate populations as hot-swapped LoRA adapters in one vLLM `generate` per chunk. It does not
    draft members from the center (vLLM's speculative decoding takes a separate draft model)."""

    drafts = drafts_first = False

    def __init__(self, source: str, space: SVDSpace, max_new_tokens: int,
                 dtype: torch.dtype, quantization: str, max_loras: int, memory: dict, max_model_len: int,
                 seed: int, parallel: dict | None = None) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM, SamplingParams


        self.space, self.source, self.max_loras = space, source, max_loras
        self.scratch = make_scratch("essa-adapters")
        self.ids = itertools.count(1)
        self.sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        kwargs = {"quantization": "bitsandbytes"} if quantization == "nf4" else {}
        self.llm = LLM(model=source, tokenizer=source, enable_lora=True, max_loras=max_loras,
                       max_cpu_loras=max_loras, max_lora_rank=lora_rank_for_vllm(space.rank),
                       dtype=str(dtype).removeprefix("torch."), max_model_len=max_model_len, seed=seed,
                       enable_prefix_caching=False, **memory, **kwargs, **(parallel or {}))

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

    def chunking(self, n_prompts: int) -> Chunking:
        # candidate-major rows, max_loras adapters per call; vLLM schedules by length itself
        return Chunking(self.max_loras * n_prompts)

    def generate_rows(self, candidates: torch.Tensor, prompts: list[str], rows: Rows,
                      on_rows: OnRows | None = None, drafts: list[str] | None = None) -> RowsOutput:
        """One vLLM call; `on_rows` is not called (vLLM reports no progress inside a call), and `drafts`
        is never given (`drafts` is False)."""
        start = time.perf_counter()
        members = sorted(set(rows.members))
        requests, write, load = self._load_adapters(candidates[members])
        by_member = dict(zip(members, requests))
        try:
            outputs = self.llm.generate([prompts[j] for j in rows.prompts], self.sampling,
                                        lora_request=[by_member[m] for m in rows.members], use_tqdm=False)
        finally:
            self._release(requests)
        return RowsOutput([o.outputs[0].text for o in outputs], sum(len(o.outputs[0].token_ids) for o in outputs),
                          time.perf_counter() - start, {"seconds_adapter_write": write, "seconds_adapter_load": load})

    def generate(self, candidates: torch.Tensor, prompts: list[str]) -> Generation:
        return generate(self, candidates, prompts, [0] * len(prompts))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        del self.llm
