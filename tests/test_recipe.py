import re
from pathlib import Path

import pytest

from essa import recipe
from essa.cli import main
from essa.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_loads():
    paths = sorted((ROOT / "recipes").glob("*.toml"))
    assert paths
    for path in paths:
        assert recipe.load(path).source == str(path)


def test_bundled_quickstart_is_the_repository_file():
    assert recipe.bundled("quickstart").read_text() == (ROOT / "recipes" / "quickstart.toml").read_text()


def test_overrides_use_dotted_keys_and_toml_values(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[run]\niterations = 10\n")
    r = recipe.load(path, ["run.iterations=2", "strategy.sigma=0.5", "model.quantization=nf4",
                           'lora.target_modules=["q_proj"]'])
    assert (r.run.iterations, r.strategy.sigma, r.model.quantization) == (2, 0.5, "nf4")
    assert r.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize("text, key, allowed", [
    ("[run]\niteratons = 3\n", "run.iteratons", "allowed keys: iterations"),
    ("[run]\niterations = 'many'\n", "run.iterations", "expected an integer"),
    ("[run]\niterations = 0\n", "run.iterations", "a number > 0"),
    ("[model]\nquantization = 'int3'\n", "model.quantization", "one of 'none', 'int8', 'nf4', 'fp4'"),
    ("[strategy]\nname = \"es\"\npopulation = 5\n", "strategy.population", "even population"),
    ("[strategy]\nname = \"essam\"\nsharpness_population = 3\n", "strategy.sharpness_population",
     "even sharpness_population"),
    ("[strategy]\nname = \"cma\"\ncovariance = \"dense\"\n", "strategy.covariance", "'auto', 'full'"),
    ("[svd]\ntrainable_fraction = 1.5\n", "svd.trainable_fraction", "(0, 1]"),
    ("[optimizer]\nlr = 1\n", "optimizer", "unknown section"),
    ("[lora]\nadapter = '/nonexistent/adapter'\n", "lora.adapter", "no PEFT adapter"),
    ("[run\n", "syntax", "not valid TOML"),
])
def test_bad_recipes_name_file_and_key(tmp_path, text, key, allowed):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        recipe.load(path)
    assert str(err.value).startswith(f"{path}: {key}: ")
    assert allowed in str(err.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_strings_torch_accepts(tmp_path, device):
    path = tmp_path / "r.toml"
    path.write_text(f'[model]\ndevice = "{device}"\n')
    assert recipe.load(path).model.device == device


def test_bad_override_is_reported():
    with pytest.raises(RecipeError, match="--set expects section.key=value"):
        recipe.apply_overrides({}, ["iterations=2"], "r.toml")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[strategy]\nsigma = -1\n")
    assert main(["align", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: strategy.sigma: expected a number > 0 and <= 1000000, got -1"]
    assert not (tmp_path / "run").exists()


def test_cli_missing_recipe_file(tmp_path, capsys):
    assert main(["align", str(tmp_path / "nope.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_docs_cover_every_recipe_key():
    docs = (ROOT / "docs" / "recipes.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+\.[a-z_0-9]+)`", docs))
    missing = [k for k in recipe.all_keys() if k not in documented]
    assert not missing, f"docs/recipes.md lacks {missing}"


def test_help_documents_every_option(capsys):
    for argv, options in [(["align", "--help"], ["--set", "--out", "--resume"]),
                          (["export", "--help"], ["--adapter", "--merged", "--center"]),
                          (["recipe", "check", "--help"], ["--set", "RECIPE"]),
                          (["score", "--help"], ["--reward", "--reward-kwargs", "--input", "--output"]),
                          (["eval", "--help"], ["--adapter", "--limit", "--set", "--report"])]:
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert all(o in out for o in options)


def test_reward_section_accepts_one_or_several_weighted_rewards(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[reward]\nname = ["gsm8k", "countdown"]\nweights = [1, 0.5]\nkwargs = { mode = "strict" }\n')
    r = recipe.load(path)
    assert r.reward.name == ["gsm8k", "countdown"] and r.reward.weights == [1.0, 0.5]
    assert r.reward.kwargs == {"mode": "strict"}
    path.write_text("[reward]\nname = 3\n")
    with pytest.raises(RecipeError, match="expected a string or a list of strings, got 3"):
        recipe.load(path)


def test_recipe_check_prints_the_plan_without_loading_weights(capsys):
    assert main(["recipe", "check", str(ROOT / "recipes" / "quickstart.toml")]) == 0
    out = capsys.readouterr().out
    assert "quickstart.toml: valid" in out
    assert "search dimension: 960 (120 modules, 2 factors, trainable singular values)" in out
    assert ("population 16 × 48 prompts per iteration (816 rows, the center's included, in generate calls of up to "
            "256)") in out
    assert "memory estimate" in out


def test_recipe_check_rejects_a_broken_recipe(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[lora]\nrnak = 4\n")
    assert main(["recipe", "check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: lora.rnak: unknown key")


def test_every_shipped_recipe_passes_recipe_check(capsys):
    # Offline (conftest), hub models are validated and their plan is reported as not computed.
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        assert main(["recipe", "check", str(path)]) == 0, path
        assert f"{path}: valid" in capsys.readouterr().out


def test_an_unreachable_hub_costs_one_quick_try(tmp_path):
    """Offline, huggingface_hub would retry each file five times with back-off; essa asks once. The hub
    here is a loopback port nothing listens on, so the connection is refused at once."""
    import os
    import subprocess
    import sys

    path = tmp_path / "hub.toml"
    path.write_text('[model]\nname_or_path = "nobody/no-such-model"\n')
    env = os.environ | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "essa", "align", str(path), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: model.name_or_path: cannot load 'nobody/no-such-model': the hub "
                                   "(http://127.0.0.1:9) is not reachable and the model is not in the local cache; "
                                   "offline? use a local directory, a .gguf file or 'smollm2-135m-instruct'")
    assert "Retry" not in proc.stdout + proc.stderr


def test_recipe_check_counts_every_entry_of_the_factors_when_they_are_searched(capsys):
    # SmolLM2-135M, q/k/v/o at r = 4: per layer 4·(576+576) + 2·4·(576+192) + 4·(576+576), 30 layers
    assert main(["recipe", "check", str(ROOT / "recipes" / "quickstart.toml"), "--set", 'svd.space="factors"']) == 0
    out = capsys.readouterr().out
    assert "search dimension: 460800 (120 modules, 2 factors, every entry)" in out
    assert "CMA-ES covariance: diagonal (sep-CMA)" in out
