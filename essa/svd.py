"""The search space: LoRA factors in SVD form, with only their singular values trainable.

Each LoRA factor is factorized on its own, as in ESSA:

    A = U_A diag(s_A) V_Aᵀ   (A: rank × in)        B = U_B diag(s_B) V_Bᵀ   (B: out × rank)

U and V stay frozen. A search vector holds *offsets* to the top `trainable_fraction` of each
factor's singular values, module after module ([A's, then B's] for each module), so the zero
vector is the initial adapter.

Without an SFT adapter, B = 0 and its SVD is degenerate (any orthonormal U_B fits). The
"principal" initialization therefore chooses the frozen directions from the base weight
W = U S Vᵀ: V_A = V[:, :r], U_B = U[:, :r], U_A = V_B = I, s_A = 1, s_B = 0. The adapter starts
exactly at the base model and a candidate's s_B moves W's top-r singular directions (in weight
units; s_A rescales them), which is where a small change of a weight matters most.
`svd.directions = "random"` draws V_A and U_B instead as random orthonormal columns (seeded by the
run's seed and the module's name), with the same scale, to measure what W's directions are worth.

Which singular values are searched (`svd.factors`): "both" (A's and B's, as in the paper) or "b"
(B's only). With the principal initialization a module's delta is U_r diag(s_A ⊙ s_B) V_rᵀ, so
A's values act only through the product and, while s_B = 0, not at all: searching B's alone
spans the same deltas with half the dimensions. From an SFT adapter the two differ (A's values
then mix with B's through V_Bᵀ U_A), and "b" is a restriction.

What is searched (`svd.space`): "singular_values" (above), or "factors": every entry of the LoRA
factors A and B themselves, as offsets to the same initial adapter (OpenAI-ES / ES-at-scale style,
the center a float64 master copy). A rescaling of r fixed directions per factor cannot rotate them
or leave their span; the factors can, at the price of a dimension of r·(in + out) per module
(460,800 for SmolLM2-135M's q/k/v/o at r = 4), which only separable strategies afford. The engine
evaluates such a population as one shared term of rank population × r with each row masked to its
own candidate's block (essa/engines/hf.py), so no per-row matrices are built.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.integrations import dequantize_module_weight
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from essa.adapter_files import read_peft_adapter
from essa.errors import EssaError
from essa.files import atomic_path

FACTORS = ("both", "b")
SPACES = ("singular_values", "factors")
DIRECTIONS = ("principal", "random")


@dataclass(frozen=True)
class Factor:
    """factor = U diag(s) Vᵀ."""

    U: Tensor
    s: Tensor
    V: Tensor

    def matrix(self, s: Tensor) -> Tensor:
        return (self.U.double() * s.double()) @ self.V.double().T


@dataclass(frozen=True)
class ModuleFactors:
    name: str
    a: Factor
    b: Factor
    scaling: float


def svd_factor(matrix: Tensor) -> Factor:
    U, s, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return Factor(U.float().cpu(), s.float().cpu(), Vh.T.float().cpu())


def find_targets(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Linear]:
    """Linear modules whose full name or last name component is listed (peft's matching rule)."""
    wanted = set(target_modules)
    targets = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (name in wanted or name.rsplit(".", 1)[-1] in wanted)}
    if not targets:
        raise EssaError(f"lora.target_modules: none of {target_modules} matches a linear layer of the model")
    return targets


def base_weight(module: nn.Linear) -> Tensor:
    """The (dequantized) base weight, out × in, in float32."""
    return dequantize_module_weight(module).detach().float()


def principal_factors(name: str, module: nn.Linear, rank: int, scaling: float) -> ModuleFactors:
    # The SVD runs where the weight lives (fast on a GPU); the space itself is kept on the CPU.
    U, _, Vh = torch.linalg.svd(base_weight(module).double(), full_matrices=False)
    return initial_factors(name, U, Vh.T, rank, scaling)


def random_factors(name: str, module: nn.Linear, rank: int, scaling: float, seed: int) -> ModuleFactors:
    # crc32, not hash(): Python salts str hashes per process, and every process must draw the same.
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    k = min(rank, module.out_features, module.in_features)
    U = torch.linalg.qr(torch.randn(module.out_features, k, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(module.in_features, k, generator=generator, dtype=torch.float64))[0]
    return initial_factors(name, U, V, k, scaling)


def initial_factors(name: str, U: Tensor, V: Tensor, rank: int, scaling: float) -> ModuleFactors:
    """The adapter at the base model (s_B = 0) whose s_B moves the directions U[:, :r] V[:, :r]ᵀ."""
    rank = min(rank, U.shape[1])
    a = Factor(torch.eye(rank), torch.ones(rank), V[:, :rank].float().cpu())
    b = Factor(U[:, :rank].float().cpu(), torch.zeros(rank), torch.eye(rank))
    return ModuleFactors(name, a, b, scaling)


def adapter_factors(name: str, module: nn.Linear, lora_a: Tensor, lora_b: Tensor, scaling: float) -> ModuleFactors:
    a = svd_factor(lora_a)
    if torch.count_nonzero(lora_b) == 0:
        # A fresh (untrained) adapter: B's SVD is degenerate, so fall back to principal directions.
        b = principal_factors(name, module, lora_a.shape[0], scaling).b
    else:
        b = svd_factor(lora_b)
    return ModuleFactors(name, a, b, scaling)


def searched_entries(rank: int, rows: int, cols: int, trainable_fraction: float, space: str) -> int:
    """How many entries of the search vector move one factor (rows × cols, of the given rank)."""
    if space == "factors":
        return rows * cols
    return max(1, math.ceil(trainable_fraction * rank))


class SVDSpace:
    """All adapted modules' frozen factors and the map between a flat search vector and them."""

    def __init__(self, modules: list[ModuleFactors], trainable_fraction: float, factors: str = "both",
                 space: str = "singular_values") -> None:
        if factors not in FACTORS:
            raise EssaError(f"svd.factors: {factors!r} is not one of {', '.join(FACTORS)}")
        if space not in SPACES:
            raise EssaError(f"svd.space: {space!r} is not one of {', '.join(SPACES)}")
        self.modules = modules
        self.trainable_fraction = trainable_fraction
        self.factors = factors
        self.space = space
        self.slices: list[tuple[slice, slice]] = []
        start = 0
        for m in modules:
            ka = self._trainable(m.a) if factors == "both" else 0
            kb = self._trainable(m.b)
            self.slices.append((slice(start, start + ka), slice(start + ka, start + ka + kb)))
            start += ka + kb
        self.dim = start

    def _trainable(self, factor: Factor) -> int:
        return searched_entries(len(factor.s), len(factor.U), len(factor.V), self.trainable_fraction, self.space)

    def singular_values(self, offsets: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per module, (s_A, s_B) for each candidate: offsets [P, dim] -> ([P, r], [P, r])."""
        if self.space != "singular_values":
            raise ValueError(f"a space of {self.space} has no per-candidate singular values")
        offsets = torch.as_tensor(offsets, dtype=torch.float32)
        out = []
        for m, (sa, sb) in zip(self.modules, self.slices):
            s_a = m.a.s.expand(len(offsets), -1).clone()
            s_b = m.b.s.expand(len(offsets), -1).clone()
            s_a[:, : sa.stop - sa.start] += offsets[:, sa]
            s_b[:, : sb.stop - sb.start] += offsets[:, sb]
            out.append((s_a, s_b))
        return out

    def lora_factors(self, offsets: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per module, (A, B) of each candidate, in float32: offsets [P, dim] -> ([P, r, in], [P, out, r])."""
        offsets = torch.atleast_2d(torch.as_tensor(offsets))
        if self.space == "factors":
            return [(self._moved(m.a, offsets[:, sa]), self._moved(m.b, offsets[:, sb]))
                    for m, (sa, sb) in zip(self.modules, self.slices)]
        return [(torch.stack([m.a.matrix(v) for v in s_a]).float(), torch.stack([m.b.matrix(v) for v in s_b]).float())
                for m, (s_a, s_b) in zip(self.modules, self.singular_values(offsets))]

    @staticmethod
    def _moved(factor: Factor, offsets: Tensor) -> Tensor:
        """The factor plus each candidate's offsets (none: the factor), summed in float64."""
        initial = factor.matrix(factor.s)
        moved = initial.expand(len(offsets), -1, -1).clone()
        if offsets.shape[1]:
            moved += offsets.double().reshape(moved.shape)
        return moved.float()

    def lora_weights(self, offsets: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Materialized LoRA (A, B) per module for one candidate, in float32."""
        factors = self.lora_factors(torch.as_tensor(offsets).reshape(1, -1))
        return {m.name: (a[0], b[0]) for m, (a, b) in zip(self.modules, factors)}

    @property
    def rank(self) -> int:
        return max(len(m.a.s) for m in self.modules)

    def save(self, path: Path) -> None:
        tensors = {f"{m.name}.{f}.{k}": getattr(getattr(m, f), k).contiguous().clone()
                   for m in self.modules for f in ("a", "b") for k in ("U", "s", "V")}
        meta = {"trainable_fraction": str(self.trainable_fraction), "factors": self.factors, "space": self.space,
                "modules": json.dumps([[m.name, m.scaling] for m in self.modules])}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "SVDSpace":
        """The saved space, or one line naming the damaged file and what to do."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            t = load_file(str(path))
            modules = [ModuleFactors(name, *(Factor(*(t[f"{name}.{f}.{k}"] for k in ("U", "s", "V")))
                                             for f in ("a", "b")), float(scaling))
                       for name, scaling in json.loads(meta["modules"])]
            # Spaces saved before `factors` or `space` existed searched both factors' singular values.
            space = cls(modules, float(meta["trainable_fraction"]), meta.get("factors", "both"),
                        meta.get("space", "singular_values"))
        except Exception as err:  # noqa: BLE001 - any damage to the file reads the same to the user
            raise EssaError(f"{path}: damaged search space ({type(err).__name__}); delete it and run "
                            "`essa align ... --resume` to rebuild it from the model and recipe") from None
        if not modules:
            raise EssaError(f"{path}: damaged search space (no modules); delete it and resume to rebuild it")
        return space


def build_space(model: nn.Module, rank: int, alpha: float, target_modules: list[str],
                adapter: str, trainable_fraction: float, factors: str = "both",
                directions: str = "principal", seed: int = 0, space: str = "singular_values") -> SVDSpace:
    """The search space for a model: from a PEFT adapter directory, or at the base model along
    W's principal directions or random ones (`directions`, drawn from `seed`)."""
    if adapter:
        config, weights = read_peft_adapter(Path(adapter))
        if config.get("use_dora") or config.get("bias", "none") != "none":
            raise EssaError("lora.adapter: only plain LoRA adapters (no DoRA, no bias) can be evolved")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise EssaError("lora.adapter: adapters with per-module rank_pattern/alpha_pattern are not supported")
        targets = find_targets(model, list(weights))
        scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
        modules = [adapter_factors(name, targets[name], *weights[name], scaling) for name in targets]
    else:
        if directions not in DIRECTIONS:
            raise EssaError(f"svd.directions: {directions!r} is not one of {', '.join(DIRECTIONS)}")
        scaling = (alpha or rank) / rank
        modules = [principal_factors(name, module, rank, scaling) if directions == "principal"
                   else random_factors(name, module, rank, scaling, seed)
                   for name, module in find_targets(model, target_modules).items()]
    return SVDSpace(modules, trainable_fraction, factors, space)
