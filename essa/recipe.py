"""Recipes: TOML files parsed into typed, validated, frozen dataclasses.

Every field is documented in docs/recipes.md (a test keeps the two in step). Validation is
generic over the dataclass type hints plus an optional per-field check, so that every error
names the recipe file, the dotted key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

from essa.errors import RecipeError


def _checked(default: Any, check: Callable[[Any], bool], allowed: str) -> Any:
    factory = (lambda: copy.copy(default)) if isinstance(default, (list, dict)) else None
    meta = {"check": (check, allowed)}
    if factory:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def between(default: float, low: float, high: float, low_open: bool = False) -> Any:
    """A number in [low, high] (or (low, high]); the upper bounds are far above any sane value and
    exist so that a typo such as 10**30 is an error here, not an allocation failure later."""
    above = (lambda v: v > low) if low_open else (lambda v: v >= low)
    allowed = f"a number {'>' if low_open else '>='} {low:g} and <= {high:.15g}"
    return _checked(default, lambda v: above(v) and v <= high, allowed)


def positive(default: float, high: float = 1e9) -> Any:
    return between(default, 0, high, low_open=True)


def non_negative(default: float, high: float = 1e9) -> Any:
    return between(default, 0, high)


@dataclass(frozen=True)
class ModelSection:
    name_or_path: str = "smollm2-135m-instruct"
    quantization: Literal["none", "int8", "nf4", "fp4"] = "none"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = _checked("auto", lambda v: re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v) is not None,
                           "'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
class LoraSection:
    rank: int = positive(8, 4096)
    alpha: float = non_negative(0.0, 1e6)
    target_modules: list[str] = _checked(["q_proj", "k_proj", "v_proj", "o_proj"], bool,
                                         "a non-empty list of module names")
    adapter: str = ""


@dataclass(frozen=True)
class WarmStartSection:
    method: Literal["none", "rejection", "reference"] = "none"
    prompts: int = positive(64, 10**7)
    samples_per_prompt: int = positive(4, 4096)
    temperature: float = positive(0.8, 100)
    min_reward: float = between(0.0, -1e9, 1e9)
    finished_only: bool = False
    repair: str = ""
    response_field: str = "answer"
    epochs: float = positive(2.0, 10**4)
    learning_rate: float = positive(1e-3, 10)
    batch_size: int = positive(8, 10**5)
    pass_tokens: int = positive(1024, 10**9)
    max_length: int = positive(1024, 10**7)
    rounds: int = positive(1, 10**4)


@dataclass(frozen=True)
class SVDSection:
    trainable_fraction: float = _checked(1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    factors: Literal["both", "b"] = "both"
    directions: Literal["principal", "random"] = "principal"
    space: Literal["singular_values", "factors"] = "singular_values"


@dataclass(frozen=True)
class StrategySection:
    name: Literal["es", "cma", "essam"] = "cma"
    population: int = between(8, 2, 65536)
    sigma: float = positive(0.5, 1e6)
    learning_rate: float = positive(0.1, 1e6)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = non_negative(0.0)
    fitness_shaping: Literal["centered_rank", "zscore"] = "centered_rank"
    antithetic: bool = True
    sigma_schedule: Literal["constant", "linear", "cosine"] = "constant"
    learning_rate_schedule: Literal["constant", "linear", "cosine"] = "constant"
    final_fraction: float = _checked(0.1, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    covariance: Literal["auto", "full", "diagonal"] = "auto"
    rho: float = non_negative(1.0, 1e6)
    sharpness_population: int = _checked(0, lambda v: v == 0 or 2 <= v <= 65536,
                                         "0 (= population) or an integer in [2, 65536]")


@dataclass(frozen=True)
class DataSection:
    source: str = "format-instructions"
    config: str = ""
    split: str = "train"
    heldout_split: str = ""
    heldout_source: str = ""
    prompt_field: str = "prompt"
    columns: dict = _checked({}, lambda v: all(isinstance(c, str) for c in v.values()),
                             "a table of reward argument = \"dataset column\" strings")
    system_prompt: str = ""
    chat_template: bool = True
    train_size: int = positive(512, 10**8)
    heldout_size: int = positive(64, 10**8)
    prompts_per_iteration: int = positive(8, 10**6)


@dataclass(frozen=True)
class RewardSection:
    name: str | list[str] = _checked("format-instructions",
                                     lambda v: bool(v) and all(v if isinstance(v, list) else [v]),
                                     "a reward name or a non-empty list of names")
    weights: list[float] = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    timeout_s: float = positive(60.0, 86400)
    memory_gb: float = between(4.0, 0.5, 4096)


@dataclass(frozen=True)
class GenerationSection:
    max_new_tokens: int = positive(64, 10**6)
    batch_rows: int = positive(256, 10**6)
    batch_tokens: int = positive(32768, 10**9)
    dense_4bit: bool = True
    speculative: bool | Literal["auto"] = "auto"


Tracker = Literal["tensorboard", "wandb", "mlflow"]


@dataclass(frozen=True)
class RunSection:
    iterations: int = positive(20, 10**8)
    seed: int = non_negative(0, 2**32 - 1)
    eval_every: int = positive(5, 10**8)
    diagnose: bool = False
    engine: Literal["hf", "vllm"] = "hf"
    keep_checkpoints: int = positive(2, 10**4)
    report_to: Tracker | list[Tracker] = field(default_factory=list)


@dataclass(frozen=True)
class VLLMSection:
    max_loras: int = non_negative(0, 65536)
    kv_cache_gb: float = non_negative(0.0, 1e5)
    gpu_memory_utilization: float = _checked(0.85, lambda v: 0 < v <= 1, "a number in (0, 1]")
    max_model_len: int = positive(2048, 10**8)


@dataclass(frozen=True)
class DistributedSection:
    workers: int = positive(1, 100_000)
    address: str = ""
    gpus_per_worker: float | Literal["auto"] = _checked("auto", lambda v: v == "auto" or 0 <= v <= 1024,
                                                         "\"auto\" or a number in [0, 1024]")
    cpus_per_worker: float = positive(1.0, 1024)


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    warm_start: WarmStartSection = field(default_factory=WarmStartSection)
    svd: SVDSection = field(default_factory=SVDSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    data: DataSection = field(default_factory=DataSection)
    reward: RewardSection = field(default_factory=RewardSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    run: RunSection = field(default_factory=RunSection)
    vllm: VLLMSection = field(default_factory=VLLMSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    source: str = field(default="<defaults>", compare=False)
    # The sections as written (overrides applied): what recipe.json saves, trackers show and Ray workers
    # rebuild the recipe from, so the recipe travels as this one object.
    written: dict = field(default_factory=dict, compare=False, repr=False)


SECTIONS: dict[str, type] = {name: tp for name, tp in typing.get_type_hints(Recipe).items()
                             if name not in ("source", "written")}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        return {str: "a list of strings", float: "a list of finite numbers"}.get(item) or f"a list of {_describe(item)}"
    return {int: "an integer", float: "a finite number", str: "a string",
            bool: "true or false", dict: "a table of finite values"}.get(tp, str(tp))


def _matches(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(a, value) for a in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(typing.get_args(tp)[0], v) for v in value)
    if tp is float:  # inf and nan are never meaningful settings
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is str:  # a NUL byte cannot be part of a path or a name
        return isinstance(value, str) and "\0" not in value
    if tp is dict:  # kwargs reach a reward process and reports as JSON
        return isinstance(value, dict) and _json_safe(value)
    return isinstance(value, tp)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _build_section(cls: type, name: str, raw: Any, source: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(source, name, "expected a table of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            raise RecipeError(source, dotted, "unknown key; allowed keys: " + ", ".join(fields))
        tp = hints[key]
        if not _matches(tp, value):
            raise RecipeError(source, dotted, f"expected {_describe(tp)}, got {_show(value)}")
        check = fields[key].metadata.get("check")
        if check and not check[0](value):
            raise RecipeError(source, dotted, f"expected {check[1]}, got {_show(value)}")
        values[key] = float(value) if tp is float else [float(v) for v in value] if tp == list[float] else value
    return cls(**values)


def _validate(recipe: Recipe) -> None:
    strategy = recipe.strategy
    if strategy.antithetic and strategy.name != "cma":
        for key in ("population", "sharpness_population"):
            if getattr(strategy, key) % 2:
                raise RecipeError(recipe.source, f"strategy.{key}",
                                  f"antithetic sampling needs an even {key}, got {getattr(strategy, key)}")
    if recipe.model.quantization != "none" and recipe.model.dtype == "float16" and recipe.model.device == "cpu":
        raise RecipeError(recipe.source, "model.dtype", "float16 is not supported on CPU; use float32 or auto")
    if recipe.svd.space == "factors" and strategy.name == "cma" and strategy.covariance == "full":
        raise RecipeError(recipe.source, "strategy.covariance",
                          "a full covariance over every entry of the LoRA factors (svd.space = \"factors\") "
                          "takes dimension² memory; use \"auto\" or \"diagonal\", or strategy.name = \"es\"")
    adapter = recipe.lora.adapter
    if adapter and recipe.warm_start.method != "none":
        raise RecipeError(recipe.source, "warm_start.method",
                          f"{recipe.warm_start.method!r} produces the starting adapter, so it cannot be combined "
                          "with lora.adapter; set one of them")
    if recipe.warm_start.rounds > 1 and recipe.warm_start.method != "rejection":
        raise RecipeError(recipe.source, "warm_start.rounds",
                          "each further round samples from the adapter so far, so it needs "
                          "warm_start.method = \"rejection\"")
    if recipe.warm_start.repair and recipe.warm_start.method != "rejection":
        raise RecipeError(recipe.source, "warm_start.repair",
                          "repairs the base model's samples, so it needs warm_start.method = \"rejection\"")
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise RecipeError(recipe.source, "lora.adapter",
                          f"no PEFT adapter (adapter_config.json) in directory {adapter!r}")


def from_dict(raw: dict[str, Any], source: str) -> Recipe:
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise RecipeError(source, name, "unknown section; allowed sections: " + ", ".join(SECTIONS))
        sections[name] = _build_section(SECTIONS[name], name, value, source)
    recipe = Recipe(**sections, source=source, written=raw)
    _validate(recipe)
    return recipe


def _parse_value(text: str) -> Any:
    """Parse a --set value as a TOML value; bare words that are not TOML are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw recipe dict (before validation)."""
    values = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(source, item, "--set expects section.key=value, e.g. run.iterations=2")
        values[key.strip()] = _parse_value(value.strip())
    return with_values(raw, values, source, "--set expects section.key=value, e.g. run.iterations=2")


def with_values(raw: dict[str, Any], values: dict[str, Any], source: str,
                usage: str = "expected a key of the form section.key, e.g. run.iterations") -> dict[str, Any]:
    """A copy of a raw recipe dict with `{"section.key": value}` set (before validation)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in values.items():
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            raise RecipeError(source, key, usage)
        section, name = parts
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise RecipeError(source, section, "expected a table of keys")
        merged[section][name] = value
    return merged


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file the user gave, or one line saying why it cannot be read."""
    if not path.is_file():
        raise RecipeError(str(path), "file", f"{what} not found" + (" (a directory)" if path.is_dir() else ""))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(str(path), "file", f"{what} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise RecipeError(str(path), "file", f"cannot read the {what} ({err.strerror})") from None


def read_raw(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_text(path, "recipe file"))
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(str(path), "syntax", f"not valid TOML ({err})") from None


def read_saved(path: Path) -> dict[str, Any]:
    """The recipe an `essa align` run saved (recipe.json), or one line saying it is damaged."""
    try:
        raw = json.loads(read_text(path, "saved recipe"))
    except json.JSONDecodeError as err:
        raw = f"not valid JSON ({err.msg} at line {err.lineno})"
    if not isinstance(raw, dict):
        detail = raw if isinstance(raw, str) else "not a JSON object"
        raise RecipeError(str(path), "file", f"damaged saved recipe: {detail}; replace it with the original "
                          "recipe (or delete it and pass the recipe file again with --resume)")
    return raw


def load(path: Path, overrides: list[str] = ()) -> Recipe:
    return from_dict(apply_overrides(read_raw(path), list(overrides), str(path)), str(path))


def bundled(name: str) -> Path:
    """Path of a recipe shipped with the package (recipes/ in the repository)."""
    return Path(str(resources.files("essa.recipes") / f"{name}.toml"))


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return {name: dataclasses.asdict(getattr(recipe, name)) for name in SECTIONS}


def all_keys() -> list[str]:
    """Every dotted key a recipe accepts (used to keep docs/recipes.md complete)."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]

