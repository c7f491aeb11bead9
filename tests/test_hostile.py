"""Hostile input, one regression test per class of case (issue 12): every one ends in one `error:` line
and exit 2 (1 for the environment, e.g. a full disk), without a traceback or a hang, and loses nothing."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from essa import checkpoint
from essa.cli import main
from essa.errors import EssaError
from essa.metrics import MetricsLog
from essa.scoring import Scorer
from tests.conftest import write_recipe

pytestmark = pytest.mark.hostile


def fails(capsys, argv: list[str], match: str, code: int = 2) -> str:
    """Run the CLI in-process; it must return `code` with one `error:` line (last) and no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines and lines[-1].startswith("error: ")
    assert sum(line.startswith("error:") for line in lines) == 1
    assert match in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished two-iteration run on the tiny model; tests copy it before damaging it."""
    tmp = tmp_path_factory.mktemp("hostile")
    recipe = write_recipe(tmp / "recipe.toml", tiny_model_dir, run={"iterations": 2, "eval_every": 1})
    assert main(["align", str(recipe), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


# Recipes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (["strategy.sigma=inf"], "strategy.sigma: expected a finite number, got inf"),
    (["strategy.learning_rate=nan"], "strategy.learning_rate: expected a finite number"),
    (["run.seed=4294967296"], "run.seed: expected a number >= 0 and <= 4294967295"),
    (["generation.max_new_tokens=1000000000000000000000000000000"], "generation.max_new_tokens: expected a number"),
    (["lora.rank=10000"], "lora.rank: expected a number > 0 and <= 4096"),
    (["lora.rank=100"], "lora.rank: 100 exceeds the smallest adapted layer's dimension (32)"),
    (["generation.max_new_tokens=256"], "does not fit the model's context of 256 tokens"),
    (['reward.name="no-such-reward"'], "reward.name: unknown reward 'no-such-reward'"),
    (["reward.name=[]"], "reward.name: expected a reward name or a non-empty list of names"),
    (["reward.timeout_s=inf"], "reward.timeout_s: expected a finite number"),
    (['reward.kwargs={modee = "strict"}', 'reward.name="gsm8k"'], "'modee' is not an option of gsm8k"),
    (['data.source="missing.jsonl"'], "data.source: file 'missing.jsonl' not found"),
    (['data.columns={answer = 3}'], "data.columns: expected a table of reward argument"),
    (['model.device="cudaXYZ"'], "model.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'cudaXYZ'"),
    (['model.device="cuda:"'], "model.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (['model.device="cuda:0 "'], "model.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (['model.device="CPU"'], "model.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
])
def test_recipe_check_rejects_what_align_could_not_run(tiny_recipe, capsys, overrides, match):
    recipe = tiny_recipe()
    args = [a for o in overrides for a in ("--set", o)]
    fails(capsys, ["recipe", "check", str(recipe), *args], match)


def test_unreadable_recipe_files(tmp_path, capsys):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    fails(capsys, ["recipe", "check", str(binary)], "recipe file is not UTF-8 text")
    fails(capsys, ["align", str(tmp_path), "--out", str(tmp_path / "o")], "recipe file not found (a directory)")
    # A file that exists and cannot be read, whoever runs the tests (root reads a chmod-000 file).
    fails(capsys, ["recipe", "check", "/proc/self/mem"], "cannot read the recipe file (Input/output error)")
    if os.geteuid():
        locked = tmp_path / "locked.toml"
        locked.write_text("[run]\niterations = 1\n")
        locked.chmod(0)
        fails(capsys, ["recipe", "check", str(locked)], "cannot read the recipe file (Permission denied)")


def test_models_that_are_not_models(tmp_path, tiny_recipe, capsys):
    (tmp_path / "nomodel").mkdir()
    (tmp_path / "nomodel" / "config.json").write_text('{"hidden_size": 8}')
    fails(capsys, ["recipe", "check", str(tiny_recipe()), "--set", f'model.name_or_path="{tmp_path / "nomodel"}"'],
          "model.name_or_path: cannot read the config of")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    fails(capsys, ["recipe", "check", str(tiny_recipe()), "--set", f'model.name_or_path="{fake}"'],
          "is not a GGUF file")


# Data ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, match", [
    (b'{"text": "no prompt here"}\n' * 8, "has no field 'prompt'"),
    (b"\xff\xfe\x00\x01binary" * 20, "is not UTF-8 text"),
    (b'{"prompt": 42}\n' * 8, "must be a non-empty string, got 42"),
    (b'{"prompt": "ok"}\n[1, 2]\n' * 4, "expected a JSON object per line, got list"),
    (b"", "has 0 rows, need more than 2"),
])
def test_bad_data_fails_before_the_model_loads(tmp_path, tiny_recipe, capsys, content, match):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    recipe = tiny_recipe(data={"source": str(data), "heldout_size": 2, "train_size": 4, "prompts_per_iteration": 2})
    start = time.perf_counter()
    fails(capsys, ["align", str(recipe), "--out", str(tmp_path / "run")], match)
    assert time.perf_counter() - start < 60  # once, a missing source hung for minutes
    assert not (tmp_path / "run" / "space.safetensors").exists()  # nothing was loaded or written


def test_numeric_answers_are_scored_not_zeroed(tmp_path, tiny_recipe, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": 2 * i}) + "\n" for i in range(12)))
    recipe = tiny_recipe(data={"source": str(data), "heldout_size": 2, "train_size": 8, "prompts_per_iteration": 2},
                         reward={"name": "gsm8k"})
    assert main(["recipe", "check", str(recipe)]) == 0
    scorer = Scorer.from_recipe("gsm8k", [], {}, columns=["answer"])
    scores, failures = scorer(["q", "q"], ["so #### 4", "it is 7"], {"answer": [4, 8]})
    assert scores.tolist() == [1.0, 0.0] and failures == 0
    scorer.close()


def test_missing_reward_column_is_named(tmp_path, tiny_recipe, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "solution": str(i)}) + "\n" for i in range(12)))
    recipe = tiny_recipe(data={"source": str(data), "heldout_size": 2}, reward={"name": "gsm8k"})
    fails(capsys, ["recipe", "check", str(recipe)], "reward gsm8k needs column 'answer'")
    assert main(["recipe", "check", str(recipe), "--set", 'data.columns={answer = "solution"}']) == 0


# Adapters and run directories ------------------------------------------------------------------

def test_damaged_adapters(run_dir, tmp_path, tiny_recipe, capsys):
    adapter = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--adapter", str(adapter)]) == 0
    capsys.readouterr()
    config = (adapter / "adapter_config.json").read_text()
    (adapter / "adapter_config.json").write_text("{not json")
    fails(capsys, ["recipe", "check", str(tiny_recipe(lora={"adapter": str(adapter)}))],
          "lora.adapter: " + str(adapter / "adapter_config.json") + " is damaged (JSONDecodeError)")
    fails(capsys, ["eval", str(tiny_recipe()), "--adapter", str(adapter), "--report", str(tmp_path / "r.json")],
          "--adapter: ")
    (adapter / "adapter_config.json").write_text(config)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    fails(capsys, ["eval", str(tiny_recipe()), "--adapter", str(adapter), "--report", str(tmp_path / "r.json")],
          "adapter_model.safetensors is damaged")


def test_out_that_cannot_be_a_run_directory(tmp_path, tiny_recipe, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails(capsys, ["align", str(tiny_recipe()), "--out", str(blocker)], "exists and is not a directory")
    fails(capsys, ["align", str(tiny_recipe()), "--out", str(blocker / "sub")], "--out: cannot write to")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("name, damage, match", [
    ("recipe.json", b"{half a recipe", "damaged saved recipe: not valid JSON"),
    ("recipe.json", b"[1, 2]", "damaged saved recipe: not a JSON object"),
    ("space.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not a header", "damaged search space"),
])
def test_resume_names_the_damaged_file(run_copy, capsys, name, damage, match):
    (run_copy / name).write_bytes(damage)
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    line = fails(capsys, ["align", "--out", str(run_copy), "--resume"], match)
    assert name in line
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before


def test_garbage_inside_metrics_is_an_error_not_a_silent_truncation(run_copy, capsys):
    path = run_copy / "metrics.jsonl"
    lines = path.read_text().splitlines()
    damaged = "\n".join(lines[:1] + ["garbage{"] + lines[1:]) + "\n"
    path.write_text(damaged)
    fails(capsys, ["align", "--out", str(run_copy), "--resume", "--set", "run.iterations=3"],
          f"{path}:2: damaged metrics line")
    assert path.read_text() == damaged
    # A last line cut short by a kill is what essa itself can leave: it is dropped and the run resumes.
    path.write_text("\n".join(lines) + '\n{"iteration": 3, "rew')
    assert main(["align", "--out", str(run_copy), "--resume", "--set", "run.iterations=3"]) == 0
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_every_checkpoint_damaged_is_an_error_that_deletes_nothing(run_copy, capsys):
    for state in (run_copy / "checkpoints").glob("iter-*/state.safetensors"):
        state.write_bytes(b"damaged")
    fails(capsys, ["align", "--out", str(run_copy), "--resume", "--set", "run.iterations=3"],
          "every checkpoint in")
    assert len(list((run_copy / "checkpoints").glob("iter-*"))) == 2
    fails(capsys, ["export", str(run_copy), "--adapter", str(run_copy.parent / "a")], "every checkpoint is damaged")


def test_export_to_a_file_or_from_a_damaged_run(run_copy, tmp_path, capsys):
    target = tmp_path / "exists.txt"
    target.write_text("keep me")
    fails(capsys, ["export", str(run_copy), "--adapter", str(target)], "exists and is not a directory")
    assert target.read_text() == "keep me"
    (run_copy / "space.safetensors").write_bytes(b"junk")
    fails(capsys, ["export", str(run_copy), "--adapter", str(tmp_path / "a")], "damaged search space")
    (run_copy / "recipe.json").write_text("{")
    fails(capsys, ["export", str(run_copy), "--merged", str(tmp_path / "m")], "damaged saved recipe")


# Disk full -------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs (root only, as in CI): writes past it fail with ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); CI runs as root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_mid_run_keeps_the_last_checkpoint_and_resumes_exactly(small_disk, run_dir, tiny_recipe, capsys):
    run = Path(shutil.copytree(run_dir, small_disk / "run"))
    reserve = small_disk / "reserve"
    reserve.write_bytes(b"\0" * 8192)
    filler = fill(small_disk)
    reserve.unlink()  # two free pages: the small writes of the resume fit, the next checkpoint does not
    resume = ["align", "--out", str(run), "--resume", "--set", "run.iterations=4"]
    line = fails(capsys, resume, "disk full while writing", code=1)
    assert "free some space" in line
    assert not list(run.rglob(".tmp-*")) and not list(run.rglob(".trash-*"))  # partial writes removed
    assert MetricsLog(run / "metrics.jsonl").read()  # still readable
    ckpt, skipped = checkpoint.latest(run / "checkpoints")
    assert ckpt is not None and ckpt.iteration == 2 and not skipped
    filler.unlink()
    assert main(resume) == 0
    uninterrupted = run_dir.parent / "four"
    assert main(["align", str(tiny_recipe()), "--out", str(uninterrupted), "--set", "run.iterations=4",
                 "--set", "run.eval_every=1"]) == 0
    final = "checkpoints/iter-000004/state.safetensors"
    assert np.array_equal(load_file(str(run / final))["center"], load_file(str(uninterrupted / final))["center"])


def test_checkpoint_and_metrics_writes_on_a_full_disk(small_disk):
    root = small_disk / "checkpoints"
    checkpoint.save(root, checkpoint.Checkpoint(1, {"x": np.zeros(4)}, {}), keep=2)
    metrics = MetricsLog(small_disk / "metrics.jsonl")
    metrics.append({"iteration": 1})
    filler = fill(small_disk)
    big = {"x": np.zeros(1 << 16)}
    with pytest.raises(EssaError, match="disk full") as err:
        checkpoint.save(root, checkpoint.Checkpoint(2, big, {}), keep=2)
    assert err.value.exit_code == 1
    assert sorted(p.name for p in root.iterdir()) == ["iter-000001"]
    with pytest.raises(EssaError, match="disk full"):
        metrics.append({"iteration": 2, "pad": "x" * 65536})
    assert metrics.read() == [{"iteration": 1}]
    filler.unlink()
    checkpoint.save(root, checkpoint.Checkpoint(2, big, {}), keep=2)
    assert checkpoint.latest(root)[0].iteration == 2


# Rewards and model outputs ---------------------------------------------------------------------

HOSTILE_REWARDS = """
import sys, time

def sleeps(prompts, completions, **_):
    if any("zz" in c for c in completions):
        time.sleep(10_000)
    return [1.0] * len(completions)

def huge(prompts, completions, **_):
    return [10 ** 400 if "big" in c else 1.0 for c in completions]

def exits(prompts, completions, **_):
    sys.exit(3)

def hog(prompts, completions, **_):
    return [float(len(bytearray(1 << 40)))]
"""


def test_reward_calls_are_bounded_and_fail_one_row_at_a_time(tmp_path):
    path = tmp_path / "hostile.py"
    path.write_text(HOSTILE_REWARDS)
    sleepy = Scorer.from_recipe(f"{path}:sleeps", [], {}, timeout_s=1.0)
    start = time.perf_counter()
    scores, failures = sleepy(["p"] * 3, ["a", "zz", "b"], {})
    assert scores.tolist() == [1.0, 0.0, 1.0] and failures == 1  # only the hanging row is lost
    assert time.perf_counter() - start < 30
    sleepy.close()
    for name, expected in (("huge", ([1.0, 0.0], 1)), ("exits", ([0.0, 0.0], 2)), ("hog", ([0.0, 0.0], 2))):
        scorer = Scorer.from_recipe(f"{path}:{name}", [], {}, memory_gb=1.0)
        scores, failures = scorer(["p"] * 2, ["ok", "big"], {})
        assert (scores.tolist(), failures) == expected, name
        scorer.close()


def test_essa_score_is_bounded_on_hostile_outputs_and_exits(tmp_path):
    rows = [{"prompt": "q", "response": "\\boxed{2^2^2^2^2^2^2^2}", "answer": "4"},
            {"prompt": "q", "response": "\\boxed{4}", "answer": 4}]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "essa", "score", "--reward", "math", "--timeout-s", "20",
                           "--input", str(source), "--output", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [0.0, 1.0]
    (tmp_path / "r.py").write_text(HOSTILE_REWARDS)
    source.write_text(json.dumps({"prompt": "q", "response": "zz"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "essa", "score", "--reward", f"{tmp_path / 'r.py'}:sleeps",
                           "--timeout-s", "1", "--input", str(source), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)  # a hung reward thread once kept it alive
    assert proc.returncode == 2 and "failed on every row (no result within" in proc.stderr


def test_a_reward_that_exits_is_named(tmp_path, capsys):
    (tmp_path / "r.py").write_text(HOSTILE_REWARDS)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    fails(capsys, ["score", "--reward", f"{tmp_path / 'r.py'}:exits", "--input", str(source), "--output",
                   str(tmp_path / "o.jsonl")], "failed on every row (SystemExit: 3)")


def test_scorers_have_no_quadratic_time_bombs():
    from essa.rewards import countdown, gsm8k

    start = time.perf_counter()
    assert countdown.score("<answer>" * 20_000, [1, 2], 3) == 0.0
    assert gsm8k.reward([""], ["#### " + "9" * 400_000], ["#### 5"]) == [0.0]
    assert time.perf_counter() - start < 5  # were 28 s and 78 s


# essa score / eval input -----------------------------------------------------------------------

@pytest.mark.parametrize("content, match", [
    (b'42\n', "expected a JSON object per line, got int"),
    (b'"text"\n', "expected a JSON object per line, got str"),
    (b'null\n', "expected a JSON object per line, got NoneType"),
    (b'\xff\xfe{}\n', "is not UTF-8 text"),
    (b'{"prompt": "q", "response": null, "answer": "#### 1"}\n', "row 1 of"),
    (b'{"prompt": "q", "response": "#### 1"}\n', "reward gsm8k needs column 'answer'"),
])
def test_score_input_rows(tmp_path, capsys, content, match):
    source = tmp_path / "in.jsonl"
    source.write_bytes(content)
    fails(capsys, ["score", "--reward", "gsm8k", "--input", str(source), "--output", str(tmp_path / "o.jsonl")], match)


def test_score_options(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "q", "response": "#### 1", "answer": "#### 1"}) + "\n")
    out = ["--input", str(source), "--output", str(tmp_path / "o.jsonl")]
    fails(capsys, ["score", "--reward", "gsm8k", "--input", str(source), "--output", str(tmp_path)], "is a directory")
    fails(capsys, ["score", "--reward", "gsm8k", "--reward-kwargs", '{"mode": "bogus"}', *out],
          "failed on every row (ValueError: mode must be one of strict, flexible")
    fails(capsys, ["score", "--reward", "gsm8k", "--reward-kwargs", '{"modee": "strict"}', *out],
          "'modee' is not an option of gsm8k")
    fails(capsys, ["score", "--reward", "gsm8k", "--timeout-s", "inf", *out], "--timeout-s")


@pytest.mark.parametrize("limit", ["0", "-1", "x"])
def test_eval_limit_must_be_positive(tiny_recipe, limit, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tiny_recipe()), "--limit", limit])
    assert exit_.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


# Leftovers -------------------------------------------------------------------------------------

def test_leftovers_of_interrupted_saves_and_prunes_are_swept(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save(root, checkpoint.Checkpoint(1, {"x": np.zeros(2)}, {}), keep=2)
    for leftover in (".tmp-iter-000009", ".trash-iter-000000"):
        (root / leftover).mkdir()
        (root / leftover / "meta.json").write_text("{}")
    checkpoint.save(root, checkpoint.Checkpoint(2, {"x": np.ones(2)}, {}), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter-000001", "iter-000002"]


def test_space_is_written_atomically(run_copy):
    from essa.svd import SVDSpace

    space = SVDSpace.load(run_copy / "space.safetensors")
    space.save(run_copy / "space.safetensors")
    assert not list(run_copy.glob(".tmp-*"))
    assert SVDSpace.load(run_copy / "space.safetensors").dim == space.dim
