import os
import subprocess
import sys
from pathlib import Path

import pytest

from essa.errors import EssaError
from essa.models import bundled_gguf, resolve_source


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
