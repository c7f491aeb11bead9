import math

import pytest
import torch
from torch import nn

from essa.errors import EssaError
from essa.svd import SVDSpace, adapter_factors, build_space, find_targets, principal_factors, svd_factor


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(12, 10, bias=False)
        self.v_proj = nn.Linear(12, 6, bias=False)
        self.mlp = nn.Linear(12, 12, bias=False)


def test_svd_factor_reconstructs():
    m = torch.randn(4, 9)
    f = svd_factor(m)
    assert torch.allclose(f.matrix(f.s).float(), m, atol=1e-5)
    assert torch.all(f.s[:-1] >= f.s[1:])  # descending: "top fraction" means the first k


def test_principal_init_starts_exactly_at_the_base_model_and_spans_top_directions():
    layer = nn.Linear(12, 10, bias=False)
    f = principal_factors("q", layer, rank=3, scaling=1.0)
    assert torch.count_nonzero(f.b.matrix(f.b.s)) == 0
    U, S, Vh = torch.linalg.svd(layer.weight.detach().double())
    # A's rows are W's top right singular vectors, B's columns its top left ones.
    assert torch.allclose(f.a.V.double().abs(), Vh[:3].T.abs(), atol=1e-5)
    assert torch.allclose(f.b.U.double().abs(), U[:, :3].abs(), atol=1e-5)
    # A unit offset on s_B[0] adds exactly u_0 v_0ᵀ to W, i.e. raises its top singular value by 1.
    delta = f.b.matrix(torch.tensor([1.0, 0, 0])) @ f.a.matrix(f.a.s)
    assert torch.allclose(torch.linalg.svdvals(layer.weight.double() + delta)[0], S[0] + 1, atol=1e-5)


def test_adapter_factors_round_trip_and_zero_b_falls_back_to_principal():
    layer = nn.Linear(12, 10, bias=False)
    a, b = torch.randn(3, 12), torch.randn(10, 3)
    f = adapter_factors("q", layer, a, b, 2.0)
    assert torch.allclose(f.a.matrix(f.a.s).float(), a, atol=1e-5)
    assert torch.allclose(f.b.matrix(f.b.s).float(), b, atol=1e-5)
    fresh = adapter_factors("q", layer, a, torch.zeros(10, 3), 2.0)
    assert torch.count_nonzero(fresh.b.s) == 0
    assert torch.allclose(fresh.b.U.T @ fresh.b.U, torch.eye(3), atol=1e-5)  # meaningful orthonormal directions


def test_flat_vector_maps_to_modules_with_trainable_fraction(tmp_path):
    model = TwoLayers()
    space = build_space(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj"], adapter="",
                        trainable_fraction=0.5)
    assert [m.name for m in space.modules] == ["q_proj", "v_proj"]
    assert space.dim == 2 * 2 * math.ceil(0.5 * 4)
    assert space.modules[0].scaling == 2.0
    offsets = torch.arange(1, space.dim + 1, dtype=torch.float32)[None]
    (qa, qb), (va, vb) = space.singular_values(offsets)
    assert qa[0].tolist() == [2.0, 3.0, 1.0, 1.0]  # s_A = 1 + offsets on the top half only
    assert qb[0].tolist() == [3.0, 4.0, 0.0, 0.0]
    assert va[0].tolist() == [6.0, 7.0, 1.0, 1.0]
    space.save(tmp_path / "space.safetensors")
    loaded = SVDSpace.load(tmp_path / "space.safetensors")
    assert loaded.dim == space.dim and loaded.trainable_fraction == 0.5
    for x, y in zip(space.lora_weights(offsets[0]).values(), loaded.lora_weights(offsets[0]).values()):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_targets_must_match():
    assert set(find_targets(TwoLayers(), ["q_proj"])) == {"q_proj"}
    with pytest.raises(EssaError, match="lora.target_modules"):
        find_targets(TwoLayers(), ["gate_proj"])


def test_searching_b_only_halves_the_space_and_spans_the_same_principal_deltas(tmp_path):
    model = TwoLayers()
    args = dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], adapter="", trainable_fraction=1.0)
    both, b_only = build_space(model, **args), build_space(model, **args, factors="b")
    assert b_only.dim == both.dim // 2 == 2 * 4
    offsets = torch.randn(b_only.dim)
    # The same delta from the B half of a "both" vector whose A half is zero.
    padded = torch.cat([torch.cat([torch.zeros(4), offsets[i * 4:(i + 1) * 4]]) for i in range(2)])
    for (a1, b1), (a2, b2) in zip(b_only.lora_weights(offsets).values(), both.lora_weights(padded).values()):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)  # s_A stays at 1 when only B is searched
    b_only.save(tmp_path / "b.safetensors")
    assert SVDSpace.load(tmp_path / "b.safetensors").factors == "b"


def test_spaces_saved_before_factors_existed_load_as_both(tmp_path):
    from safetensors.torch import load_file, save_file

    space = build_space(TwoLayers(), rank=4, alpha=8, target_modules=["q_proj"], adapter="", trainable_fraction=1.0)
    space.save(tmp_path / "s.safetensors")
    old_meta = {"trainable_fraction": "1.0", "modules": '[["q_proj", 2.0]]'}
    save_file(load_file(str(tmp_path / "s.safetensors")), str(tmp_path / "old.safetensors"), metadata=old_meta)
    old = SVDSpace.load(tmp_path / "old.safetensors")
    assert old.factors == "both" and old.dim == space.dim == 8


def test_unknown_factors_are_refused():
    with pytest.raises(EssaError, match="svd.factors"):
        build_space(TwoLayers(), rank=4, alpha=8, target_modules=["q_proj"], adapter="", trainable_fraction=1.0,
                    factors="a")


def test_random_directions_start_at_the_base_model_drawn_per_seed_and_module():
    args = dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], adapter="", trainable_fraction=1.0)
    principal = build_space(TwoLayers(), **args)
    drawn = build_space(TwoLayers(), **args, directions="random", seed=3)
    again = build_space(TwoLayers(), **args, directions="random", seed=3)
    other = build_space(TwoLayers(), **args, directions="random", seed=4)
    assert drawn.dim == principal.dim
    for m, p, m2, m3 in zip(drawn.modules, principal.modules, again.modules, other.modules):
        assert torch.count_nonzero(m.b.matrix(m.b.s)) == 0  # the base model, as with W's directions
        assert torch.allclose(m.b.U.T @ m.b.U, torch.eye(4), atol=1e-5)
        assert torch.allclose(m.a.V.T @ m.a.V, torch.eye(4), atol=1e-5)
        assert torch.equal(m.b.U, m2.b.U) and torch.equal(m.a.V, m2.a.V)
        assert not torch.allclose(m.b.U.abs(), m3.b.U.abs(), atol=1e-2)
        assert not torch.allclose(m.b.U.abs(), p.b.U.abs(), atol=1e-2)
    # The two modules draw different directions even from one seed.
    assert not torch.allclose(drawn.modules[0].a.V.abs(), drawn.modules[1].a.V.abs(), atol=1e-2)


def test_unknown_directions_are_refused():
    with pytest.raises(EssaError, match="svd.directions"):
        build_space(TwoLayers(), rank=4, alpha=8, target_modules=["q_proj"], adapter="", trainable_fraction=1.0,
                    directions="minor")


def test_a_run_builds_its_space_along_the_recipes_directions_from_its_seed(tiny_recipe, tmp_path):
    from essa import recipe as recipes
    from essa.engines.load import load_space
    from essa.models import load_model

    loaded = recipes.load(tiny_recipe(), ["svd.directions=random", "run.seed=7"])
    model = load_model(loaded.model)[0]
    space = load_space(tmp_path, loaded, lambda: model)
    lora = loaded.lora
    expected = build_space(model, lora.rank, lora.alpha, lora.target_modules, "", 1.0, directions="random", seed=7)
    for m, e in zip(space.modules, expected.modules):
        assert torch.equal(m.b.U, e.b.U) and torch.equal(m.a.V, e.a.V)
    # Saved with the run, so a resume reads these directions back instead of drawing again.
    assert torch.equal(SVDSpace.load(tmp_path / "space.safetensors").modules[0].b.U, space.modules[0].b.U)


def test_factor_space_moves_every_entry_of_a_and_b_from_the_initial_adapter(tmp_path):
    model = TwoLayers()
    args = dict(rank=3, alpha=6, target_modules=["q_proj", "v_proj"], adapter="", trainable_fraction=0.5)
    values, factors = build_space(model, **args), build_space(model, **args, space="factors")
    assert factors.dim == 3 * (12 + 10) + 3 * (12 + 6)  # trainable_fraction does not apply to entries
    for (a0, b0), (a, b) in zip(values.lora_weights(torch.zeros(values.dim)).values(),
                                factors.lora_weights(torch.zeros(factors.dim)).values()):
        assert torch.equal(a0, a) and torch.equal(b0, b)  # the zero vector is the initial adapter
    offsets = torch.randn(2, factors.dim, dtype=torch.float64)
    (qa, qb), _ = factors.lora_factors(offsets)
    assert qa.shape == (2, 3, 12) and qb.shape == (2, 10, 3)
    assert torch.allclose(qa[1].double() - qa[0].double(), (offsets[1] - offsets[0])[:36].reshape(3, 12), atol=1e-6)
    assert torch.allclose(qb[1].double() - qb[0].double(), (offsets[1] - offsets[0])[36:66].reshape(10, 3), atol=1e-6)
    factors.save(tmp_path / "f.safetensors")
    loaded = SVDSpace.load(tmp_path / "f.safetensors")
    assert loaded.space == "factors" and loaded.dim == factors.dim
    with pytest.raises(ValueError, match="no per-candidate singular values"):
        factors.singular_values(offsets)
    assert build_space(model, **args, factors="b", space="factors").dim == 3 * 10 + 3 * 6


def test_unknown_space_is_refused():
    with pytest.raises(EssaError, match="svd.space: 'rows' is not one of singular_values, factors"):
        build_space(TwoLayers(), rank=2, alpha=2, target_modules=["q_proj"], adapter="", trainable_fraction=1.0,
                    space="rows")
