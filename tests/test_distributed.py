"""`[distributed]` on a real local Ray cluster: N workers give the results of one process, through a
two-node cluster, a killed worker, losing every worker and resuming, and Ctrl-C.

Ray advertises the machine's external address even when told 127.0.0.1, so every Ray run here is a
subprocess inside a private network namespace with only loopback up (`unshare -n`, as root): no
test traffic leaves the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from essa.cli import main
from essa.distributed import reward_files, with_local_rewards
from tests.conftest import in_netns, netns_available

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 3
# A reward file of the user's own: the workers get its source with the recipe.
REWARD = """
def short_and_lower(prompts, completions, **_):
    return [float(c == c.lower()) + 1.0 / (1 + len(c)) for c in completions]
"""


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.ray
needs_cluster = pytest.mark.skipif(not (ray_installed() and netns_available()),
                                   reason="needs the ray extra and `unshare -n` (root) to keep Ray on loopback")


def ray_env(tmp: Path, **auth: str) -> dict[str, str]:
    """Ray's environment for a test. By default it asks for no authentication, which essa's own local
    instance must override (it always runs with a token of its own); `auth` sets RAY_AUTH_* instead."""
    auth = {f"RAY_AUTH_{k.upper()}": v for k, v in auth.items()} or {"RAY_AUTH_MODE": "disabled"}
    return os.environ | auth | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(tmp),
                         "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def ray_tmp():
    # Ray's Unix socket paths must stay under 107 bytes: pytest's tmp_path is too deep.
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as tmp:
        yield Path(tmp)


@pytest.fixture
def recipe(tiny_recipe, tmp_path):
    (tmp_path / "own_reward.py").write_text(REWARD)

    def make(**sections):
        # 4 candidates x 2 prompts in chunks of 2 rows: four chunks per iteration to spread.
        base = {"reward": {"name": f"{tmp_path / 'own_reward.py'}:short_and_lower"},
                "generation": {"max_new_tokens": 6, "batch_rows": 2},
                "run": {"iterations": ITERATIONS, "eval_every": 1}}
        return tiny_recipe(**(base | sections))

    return make


def align(recipe: Path, out: Path, tmp: Path, *sets: str, resume: bool = False, **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "essa", "align", str(recipe), "--out", str(out), *[a for s in sets for a in
                                                                                      ("--set", s)]]
    return subprocess.Popen(in_netns(args + (["--resume"] if resume else [])), env=ray_env(tmp), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


REWARD_KEYS = ("iteration", "reward_mean", "reward_std", "reward_max", "reward_failures", "candidates", "center_reward",
               "diverged_share", "reward_se", "reward_snr",
               "generated_tokens", "heldout_reward")


def results(run: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The metrics rows without timings, and every array of the final checkpoint."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = sorted((run / "checkpoints").glob("iter-*"))[-1]
    return [{k: r[k] for k in REWARD_KEYS if k in r} for r in rows], load_file(str(last / "state.safetensors"))


def assert_same(run: Path, reference: Path) -> None:
    (rows, arrays), (ref_rows, ref_arrays) = results(run), results(reference)
    assert rows == ref_rows and len(rows) == ITERATIONS + 1
    assert arrays.keys() == ref_arrays.keys() and all(np.array_equal(arrays[k], ref_arrays[k]) for k in arrays)
    assert np.abs(arrays["center"]).sum() > 0
    spaces = [space_of(r) for r in (run, reference)]
    assert spaces[0][1] == spaces[1][1] and spaces[0][0].keys() == spaces[1][0].keys()
    assert all(np.array_equal(spaces[0][0][k], spaces[1][0][k]) for k in spaces[0][0])


def space_of(run: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    # Compared by content: safetensors writes its metadata in a different order in each process.
    with safe_open(str(run / "space.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def one_process(recipe: Path, out: Path) -> Path:
    assert main(["align", str(recipe), "--out", str(out)]) == 0
    return out


@needs_cluster
@pytest.mark.parametrize("strategy", ["cma", "es"])
def test_two_workers_equal_one_process(recipe, tmp_path, ray_tmp, strategy):
    path = recipe(strategy={"name": strategy, "population": 4, "sigma": 0.5, "learning_rate": 0.2})
    reference = one_process(path, tmp_path / "one")
    code, log = finish(align(path, tmp_path / "two", ray_tmp, "distributed.workers=2"))
    assert code == 0, log
    assert "starting 2 Ray workers (1 CPU, 0 GPU each) on a local Ray instance (token authentication)" in log
    assert_same(tmp_path / "two", reference)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["bytes_sent"] < 200_000 and 0 < r["bytes_received"] < 50_000 for r in rows[1:])


CLUSTER = """
import sys
from ray.cluster_utils import Cluster
from essa.cli import main

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    code = main(["align", sys.argv[1], "--out", sys.argv[2], "--set", "distributed.workers=2",
                 "--set", f"distributed.address={cluster.address}"])
finally:
    cluster.shutdown()
sys.exit(code)
"""


@needs_cluster
def test_two_node_cluster_equals_one_process(recipe, tmp_path, ray_tmp):
    path = recipe()
    reference = one_process(path, tmp_path / "one")
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER)
    # A secured cluster, as docs/distributed.md says to start one: every node and essa share one token.
    env = ray_env(ray_tmp, mode="token", token=secrets.token_hex(32))
    proc = subprocess.Popen(in_netns([sys.executable, str(script), str(path), str(tmp_path / "two-nodes")]),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, log = finish(proc)
    assert code == 0, log
    assert "without token authentication" not in log
    assert_same(tmp_path / "two-nodes", reference)


AUTH = """
import json, os, subprocess, sys
from essa.distributed import restore_env, start_local

ray, saved = start_local()
gcs, token = ray.get_runtime_context().gcs_address, os.environ["RAY_AUTH_TOKEN"]
CLIENT = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); print('CONNECTED')"
plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}

def connect(**auth):
    proc = subprocess.run([sys.executable, "-c", CLIENT, gcs], env=plain | auth, capture_output=True, text=True,
                          timeout=240)
    return {"code": proc.returncode, "connected": "CONNECTED" in proc.stdout,
            "refused_for_token": "InvalidAuthToken" in proc.stderr}

result = {"no_token": connect(RAY_AUTH_MODE="disabled"),
          "wrong_token": connect(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
          "its_token": connect(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)}
# essa itself joining with the wrong token: one line, exit 2.
essa = subprocess.run([sys.executable, "-m", "essa", "align", sys.argv[1], "--out", sys.argv[2], "--set",
                       "distributed.workers=2", "--set", f'distributed.address="{gcs}"'],
                      env=plain | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True,
                      text=True, timeout=240)
result["essa_wrong_token"] = {"code": essa.returncode, "stderr": essa.stderr.strip().splitlines()[-3:]}
ray.shutdown()
restore_env(saved)
result["env_after"] = os.environ.get("RAY_AUTH_MODE")
print(json.dumps(result))
"""


@needs_cluster
def test_essas_local_instance_refuses_clients_without_its_token(recipe, tmp_path, ray_tmp):
    """The instance essa starts for workers > 1 runs with a token even where the environment says
    RAY_AUTH_MODE=disabled: a client without it, or with another, is refused; one with it connects."""
    script = tmp_path / "auth.py"
    script.write_text(AUTH)
    proc = subprocess.run(in_netns([sys.executable, str(script), str(recipe()), str(tmp_path / "run")]),
                          env=ray_env(ray_tmp), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for stranger in ("no_token", "wrong_token"):
        assert result[stranger] == {"code": 1, "connected": False, "refused_for_token": True}, result
    assert result["its_token"] == {"code": 0, "connected": True, "refused_for_token": False}, result
    assert result["env_after"] == "disabled"  # the driver's environment is given back
    essa = result["essa_wrong_token"]
    assert essa["code"] == 2 and essa["stderr"][-1].startswith(
        "error: distributed.address: cannot join the Ray cluster at 127.0.0.1:"), essa
    assert "InvalidAuthToken" in essa["stderr"][-1] and "Traceback" not in "".join(essa["stderr"]), essa


def worker_processes() -> list[psutil.Process]:
    """essa's Ray actors on this machine (Ray titles them `ray::Worker`, `ray::Worker.evaluate` while busy)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::Worker"):
            found.append(proc)
    return found


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the fault could be injected"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


def busy_workers() -> list[psutil.Process]:
    return [p for p in worker_processes() if (p.info["cmdline"] or [""])[0].endswith(".evaluate")]


@needs_cluster
def test_a_killed_worker_changes_nothing(recipe, tmp_path, ray_tmp):
    path = recipe(generation={"max_new_tokens": 24, "batch_rows": 2})
    reference = one_process(path, tmp_path / "one")
    run = tmp_path / "killed"
    proc = align(path, run, ray_tmp, "distributed.workers=2")
    wait_for(lambda: (run / "checkpoints" / "iter-000001").exists() and busy_workers(), proc)
    busy_workers()[0].kill()
    code, log = finish(proc)
    assert code == 0, log
    assert "a Ray worker was lost" in log and "evaluated again on the 1 remaining" in log
    assert_same(run, reference)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("workers_lost", 0) for r in rows) == 1


@needs_cluster
def test_losing_every_worker_stops_cleanly_and_resume_continues(recipe, tmp_path, ray_tmp):
    path = recipe()
    reference = one_process(path, tmp_path / "one")
    run = tmp_path / "lost"
    proc = align(path, run, ray_tmp, "distributed.workers=2")
    wait_for(lambda: (run / "checkpoints" / "iter-000001").exists() and len(worker_processes()) == 2, proc)
    for worker in worker_processes():
        worker.kill()
    code, log = finish(proc)
    assert code == 2, log
    assert "every Ray worker is gone" in log and "--resume" in log and "Traceback" not in log
    done = sorted(p.name for p in (run / "checkpoints").glob("iter-*"))
    assert done and done[-1] < f"iter-{ITERATIONS:06d}"
    code, log = finish(align(path, run, ray_tmp, "distributed.workers=2", resume=True))
    assert code == 0, log
    assert_same(run, reference)


def leftovers(tmp: Path) -> list[str]:
    """Processes of the Ray instance under `tmp` (its session lives there), and our scratch dirs."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(tmp) in part for part in proc.info["cmdline"] or []):
            found.append(" ".join(proc.info["cmdline"])[:100])
    return found + [p.name for p in Path("/dev/shm").glob("essa-worker-*")] + worker_names()


def worker_names() -> list[str]:
    return [" ".join(p.info["cmdline"]) for p in worker_processes()]


@needs_cluster
def test_ctrl_c_leaves_no_processes_or_shared_memory(recipe, tmp_path, ray_tmp):
    shm_before = set(os.listdir("/dev/shm"))
    run = tmp_path / "interrupted"
    path = recipe(run={"iterations": 5000, "eval_every": 1})  # far longer than the test waits: no race with the end
    proc = align(path, run, ray_tmp, "distributed.workers=2", start_new_session=True)
    wait_for(lambda: (run / "checkpoints" / "iter-000001").exists(), proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground process group
    code, log = finish(proc)
    assert code == 130, log
    deadline = time.time() + 30
    while leftovers(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    assert not leftovers(ray_tmp)
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def test_reward_files_reach_workers_by_content(tmp_path):
    (tmp_path / "mine.py").write_text(textwrap.dedent(REWARD))
    spec = f"{tmp_path / 'mine.py'}:short_and_lower"
    files = reward_files([spec, "format-instructions"])
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    raw = with_local_rewards({"reward": {"name": [spec, "format-instructions"]}}, files, worker_dir)
    local, builtin = raw["reward"]["name"]
    assert builtin == "format-instructions" and local.endswith(":short_and_lower")
    assert Path(local.rpartition(":")[0]).parent == worker_dir
    assert Path(local.rpartition(":")[0]).read_text() == (tmp_path / "mine.py").read_text()
