"""Seeing a run: plain log lines without a terminal, held-out completion files, the trackers' own
files read back with their own libraries (offline), and `essa report` rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from essa.cli import main
from tests.conftest import in_netns, netns_available

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def align(recipe: Path, out: Path, *sets: str, resume: bool = False, env: dict | None = None) -> str:
    """`essa align` with its output sent to a file, as under nohup or Slurm; the output. It runs in
    the run's parent directory: trackers write relative paths (MLflow's default artifact root is
    ./mlruns), which must land in the test's temporary directory, not in the working tree."""
    log = out.parent / f"{out.name}.log"
    with log.open("w") as f:
        args = [sys.executable, "-m", "essa", "align", str(recipe), "--out", str(out)]
        args += [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=out.parent, env=os.environ | (env or {}),
                              timeout=600).returncode
    text = log.read_text()
    assert code == 0, text
    return text


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_redirected_output_has_a_line_per_iteration_and_every_phase(tiny_recipe, tmp_path):
    text = align(tiny_recipe(), tmp_path / "run")
    lines = text.splitlines()
    iteration_lines = [line for line in lines if line.startswith("align ")]
    assert [line.split()[1] for line in iteration_lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("reward" in line and "tok/s" in line and "ETA" in line for line in iteration_lines)
    assert "held-out" in iteration_lines[1] and "held-out" not in iteration_lines[0]
    for phase in ("loading the model and building the SVD space: done in",
                  "evaluating the initial adapter on 4 held-out prompts: done in"):
        assert any(line.startswith(phase) for line in lines), phase
    assert "\x1b[" not in text  # no terminal escapes in a file
    assert "Loading weights" not in text  # third-party load bars are quiet


def test_every_heldout_evaluation_writes_its_completions(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    assert main(["align", str(tiny_recipe()), "--out", str(run)]) == 0
    files = sorted(p.name for p in (run / "completions").iterdir())
    assert files == ["iter-000000.jsonl", "iter-000002.jsonl", "iter-000004.jsonl"]
    metrics = {r["iteration"]: r for r in rows_of(run)}
    for name in files:
        rows = [json.loads(line) for line in (run / "completions" / name).read_text().splitlines()]
        assert len(rows) == 4 and all({"prompt", "completion", "reward"} <= r.keys() for r in rows)
        iteration = int(name[5:11])
        assert np.isclose(np.mean([r["reward"] for r in rows]), metrics[iteration]["heldout_reward"])


# IFEval-format held-out rows made here, so the test needs no copy of google/IFEval beside the checkout.
IFEVAL_ROWS = [
    {"key": 1, "prompt": "Write a short note about the sea. Your entire response should be in English, and in all "
     "lowercase letters. No capital letters are allowed.", "instruction_id_list": ["change_case:english_lowercase"],
     "kwargs": [{}]},
    {"key": 2, "prompt": "Describe a cat without using any commas. Answer with at least 20 words.",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"relation": "at least", "num_words": 20}]},
    {"key": 3, "prompt": "Wrap your entire response with double quotation marks. What is rain?",
     "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
]


def test_ifeval_completions_carry_verdicts_per_instruction(tiny_recipe, tmp_path):
    pytest.importorskip("lm_eval")
    run, heldout = tmp_path / "ifeval", tmp_path / "ifeval.jsonl"
    heldout.write_text("".join(json.dumps(row) + "\n" for row in IFEVAL_ROWS))
    recipe = tiny_recipe(data={"source": "ifeval-generated", "heldout_source": str(heldout), "train_size": 16,
                               "heldout_size": 3, "prompts_per_iteration": 2}, reward={"name": "ifeval"},
                         run={"iterations": 1, "eval_every": 1})
    assert main(["align", str(recipe), "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "completions" / "iter-000000.jsonl").read_text().splitlines()]
    assert sorted(r["instructions"] for r in rows) == sorted(r["instruction_id_list"] for r in IFEVAL_ROWS)
    assert all(len(r["instructions"]) == len(r["strict"]) == len(r["loose"]) >= 1 for r in rows)
    assert all(isinstance(v, bool) for r in rows for v in r["strict"])


def test_tensorboard_scalars_and_text_read_back_and_resume_continues(tiny_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, recipe = tmp_path / "tb", tiny_recipe(run={"iterations": 4, "eval_every": 2, "report_to": ["tensorboard"]})
    align(recipe, run, "run.iterations=2")
    align(recipe, run, "run.iterations=4", resume=True)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("reward_mean")]
    assert steps == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("heldout_reward")] == [0, 2, 4]
    assert [e.value for e in events.Scalars("reward_mean")] == pytest.approx(
        [r["reward_mean"] for r in rows_of(run)[1:]])
    texts = events.Tags()["tensors"]
    assert "recipe/text_summary" in texts and "heldout_completions/text_summary" in texts


def test_wandb_offline_run_reads_back_and_resume_keeps_its_id(tiny_recipe, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "wb"
    recipe = tiny_recipe(run={"iterations": 4, "eval_every": 2, "report_to": ["wandb"]})
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    align(recipe, run, "run.iterations=2", env=env)
    first = json.loads((run / "trackers.json").read_text())["wandb"]
    align(recipe, run, "run.iterations=4", resume=True, env=env)
    assert json.loads((run / "trackers.json").read_text())["wandb"] == first
    runs = sorted((run / "wandb").glob(f"offline-run-*-{first}"))
    assert len(runs) == 2  # the first session and the resumed one, under one run id
    history, config = wandb_history(runs)
    assert [h["_step"] for h in history if "reward_mean" in h] == [1, 2, 3, 4]
    assert [h["reward_mean"] for h in history if "reward_mean" in h] == pytest.approx(
        [r["reward_mean"] for r in rows_of(run)[1:]])
    tables = [h for h in history if h.get("heldout_completions/_type") == "table-file"]
    assert [h["_step"] for h in tables] == [0, 2, 4] and all(h["heldout_completions/nrows"] == 4 for h in tables)
    assert config["strategy"]["population"] == 4


def wandb_records(run: Path):
    """The protobuf records of an offline run file (wandb's own schema, in the LevelDB log format it
    writes: 32 KiB blocks of records with a 7-byte header, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    data, block = next(run.glob("*.wandb")).read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_history(runs: list[Path]) -> tuple[list[dict], dict]:
    """The logged rows and the config, read back from wandb's offline run files."""
    history, config = [], {}
    for run in runs:
        for record in wandb_records(run):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
            elif kind == "run":
                config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return history, config


def test_mlflow_run_queries_back_from_sqlite_and_resume_continues(tiny_recipe, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "ml"
    recipe = tiny_recipe(run={"iterations": 4, "eval_every": 2, "report_to": ["mlflow"]})
    env = {"MLFLOW_TRACKING_URI": uri}
    align(recipe, run, "run.iterations=2", env=env)
    align(recipe, run, "run.iterations=4", resume=True, env=env)
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "reward_mean")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "heldout_reward")] == [0, 2, 4]
    params = client.get_run(run_id).data.params
    assert params["strategy.population"] == "4" and params["run.iterations"] == "2"  # as first logged
    artifacts = [a.path for a in client.list_artifacts(run_id, "heldout_completions")]
    assert "heldout_completions/iter-000002.json" in artifacts


HOSTILE = ('</script><script>document.body.dataset.pwned = "1"</script>'
           '<img src=x onerror="document.body.dataset.pwned=1">')


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium, where possible in a network namespace with only loopback: the page needs
    no network, and the browser's own background requests must not leave the machine."""
    wrap = in_netns if netns_available() else list
    return subprocess.run(wrap([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--allow-file-access-from-files", *args]), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (the Debian chromium package; CI installs it)")
def test_report_renders_in_headless_chromium(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    assert main(["align", str(tiny_recipe()), "--out", str(run)]) == 0
    report = run / "report.html"
    assert report.is_file()  # align writes it at the end of every run
    # A completion that tries to be code must show as text: rewrite one into the saved files and re-render.
    path = run / "completions" / "iter-000000.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["completion"] = HOSTILE
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run)]) == 0
    dom = chromium("--dump-dom", report.as_uri()).stdout
    body = dom.split("<body")[1][:200]  # the body tag with its data-* attributes
    assert 'data-rendered="yes"' in body and "pwned" not in body and 'id="script-error"' not in dom
    assert dom.count('class="curve"') >= 5  # reward mean/max/held-out, phases, memory
    assert 'data-key="reward_snr"' in dom and 'data-key="diverged_share"' in dom  # the search's signal
    assert 'id="signal"' in dom and "of member completions differ from the center" in dom
    assert dom.count("<tr>") >= 1 + 4 and "&lt;/script&gt;" in dom
    png = tmp_path / "report.png"
    chromium(f"--screenshot={png}", "--window-size=1200,1600", report.as_uri())
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # a drawn page, not a blank one


def test_report_of_a_non_run_directory_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is it an `essa align` output?" in capsys.readouterr().err


def test_chunk_lines_count_time_from_the_start_of_the_evaluation(monkeypatch):
    """The first chunk line of a long evaluation carries that chunk's time: `essa eval` once printed
    `eval chunks 1/5  elapsed 0:00:00  ETA 0:00:00` after 7 minutes."""
    import io

    from rich.console import Console

    from essa import progress

    now = iter([100.0, 160.0, 160.0, 220.0, 220.0])  # start; then each chunk: its own clock, its line
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(now))
    out = io.StringIO()
    with progress.ChunkSteps(Console(file=out, width=200), "eval chunks", bar=False) as on_chunk:
        on_chunk(1, 3)
        on_chunk(2, 3)
    assert out.getvalue().splitlines() == ["eval chunks 1/3  elapsed 0:01:00  ETA 0:02:00",
                                           "eval chunks 2/3  elapsed 0:02:00  ETA 0:01:00"]
