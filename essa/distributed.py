"""Ray: one population evaluated by many engine replicas (workers), with the results of one process.

The driver (this process) owns the recipe, the data, the strategy, checkpoints and metrics, and
needs no GPU. Each worker is a Ray actor with its own engine and scorer on its own device. The
first worker builds the SVD space from its model; the driver saves it as the run's
space.safetensors and every other worker (and every resumed one) loads those same bytes, so all
workers evaluate exactly the same search space. Work is handed out in the chunks of rows that one
process decodes (essa/engines/rows.py: planned from the prompts' token lengths and the engine's
chunking, which a worker reports once per prompt count), so each chunk is the same batch with the same numerics
wherever it runs, and the rewards, centers and checkpoints equal those of `workers = 1`.

What crosses the wire: per chunk, the candidates it needs and its row indices; per evaluation and
node, the prompts with their reward columns; back, one reward per row (completions only for
held-out evaluations). Rewards are scored on the workers, beside the completions; a custom reward
file is sent to the workers with the recipe.

A worker that dies (actor error, lost node, out-of-memory kill) loses only the chunk it was
running: that chunk is evaluated again on a surviving worker, so the iteration's rewards do not
change. Lost workers are not replaced during a run; when none is left the run stops with its last
checkpoint intact and `--resume` starts them afresh. The scheduling is our own rather than
`ray.util.ActorPool`, which has no notion of a dead actor: a failed call raises and its work is lost.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from essa.engines.load import load_engine
from essa.engines.rows import Chunking, OnChunk, OnRows, Rows, chunk_rows
from essa.errors import EssaError
from essa.evaluation import ChunkResult, Evaluation, Task, assemble, evaluate_chunk
from essa.progress import quiet_third_party
from essa.recipe import Recipe, from_dict
from essa.reward_process import PICKLED
from essa.run_dir import SPACE_FILE
from essa.scoring import Scorer
from essa.scratch import make_scratch, sweep
from essa.svd import SVDSpace

# The driver moves kilobytes per iteration; Ray's default object store is 30% of RAM.
OBJECT_STORE_BYTES = 256 * 2**20
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def distributed(recipe: Recipe) -> bool:
    """Ray is used for more than one worker, or for one worker on a cluster named by address."""
    return recipe.distributed.workers > 1 or bool(recipe.distributed.address)


def reward_file(spec: str) -> tuple[str, str]:
    """(file, what follows it) of a reward that lives in a file: `path.py:function` or `path.pkl`."""
    if spec.endswith(PICKLED):
        return spec, ""
    path, _, function = spec.rpartition(":")
    return (path, f":{function}") if path.endswith(".py") else ("", "")


def reward_files(names: str | list[str]) -> dict[str, tuple[str, bytes]]:
    """The bytes of every reward that lives in a file (source or pickle), to recreate on the workers."""
    files = {}
    for spec in [names] if isinstance(names, str) else names:
        path, _ = reward_file(spec)
        if path:
            files[spec] = (f"reward_{len(files)}_{Path(path).name}", Path(path).expanduser().read_bytes())
    return files


def with_local_rewards(raw: dict, files: dict[str, tuple[str, bytes]], directory: Path) -> dict:
    """The recipe with each shipped reward file written to `directory` and named from there."""
    local = {}
    for spec, (name, source) in files.items():
        (directory / name).write_bytes(source)
        local[spec] = f"{directory / name}{reward_file(spec)[1]}"
    reward = dict(raw.get("reward", {}))
    names = reward.get("name")
    if names is not None:
        reward["name"] = [local.get(n, n) for n in names] if isinstance(names, list) else local.get(names, names)
    return raw | {"reward": reward}


class Worker:
    """One engine and its scorer, inside a Ray actor."""

    def setup(self, raw: dict, source: str, space: bytes | None, rewards: dict[str, tuple[str, bytes]],
              threads: int, tensor_parallel: int) -> bytes:
        """Load the model and build the engine; the space's bytes, built here when not given."""
        quiet_third_party()
        torch.set_num_threads(threads)
        self.dir = make_scratch("essa-worker")
        recipe = from_dict(with_local_rewards(raw, rewards, self.dir), source)
        if space is not None:
            (self.dir / SPACE_FILE).write_bytes(space)
        self.engine, _ = load_engine(recipe, self.dir, tensor_parallel)
        reward = recipe.reward
        self.scorer = Scorer.from_recipe(reward.name, reward.weights, reward.kwargs, reward.timeout_s, reward.memory_gb)
        return (self.dir / SPACE_FILE).read_bytes()

    def chunking(self, n_prompts: int) -> Chunking:
        return self.engine.chunking(n_prompts)

    def evaluate(self, candidates: np.ndarray, rows: Rows, task: Task, keep_texts: bool) -> ChunkResult:
        return evaluate_chunk(self.engine, self.scorer, torch.tensor(candidates), task, rows, keep_texts)

    def close(self) -> None:
        self.engine.close()
        self.scorer.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def local_rows(candidates: np.ndarray, rows: Rows) -> tuple[np.ndarray, Rows]:
    """Only the candidates a chunk uses, with its rows renumbered to match."""
    members = sorted(set(rows.members))
    index = {m: i for i, m in enumerate(members)}
    return candidates[members], Rows(tuple(index[m] for m in rows.members), rows.prompts)


def wire_size(value: Any) -> int:
    return len(pickle.dumps(value, protocol=5))


def root_cause(err: BaseException) -> str:
    """Why Ray could not join: a refused token (which Ray reports inside a chained traceback's
    text), else the first line of the innermost exception."""
    chain = [err]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    if any("InvalidAuthToken" in str(e) for e in chain):
        return "InvalidAuthToken: the cluster refused essa's token, or essa has none"
    text = str(chain[-1]).strip()
    return f"{type(chain[-1]).__name__}: {text.splitlines()[0][:160]}" if text else type(chain[-1]).__name__


def token_auth() -> bool:
    """Whether this process's Ray connection authenticates with a token (Ray >= 2.52)."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return get_authentication_mode() == AuthenticationMode.TOKEN


def start_local() -> tuple[Any, dict[str, str | None]]:
    """A private local Ray instance that refuses any client without its token; Ray and the
    environment it replaced (to restore after `ray.shutdown()`).

    Whatever the environment says (RAY_AUTH_MODE=disabled included), the instance gets a fresh
    random token, in this process's environment only: Ray hands it to the processes it starts
    (GCS, raylet, workers) and to nothing else. Ray reads the mode when it is imported or when its
    config is reloaded, so an already imported Ray reloads it (as ray.init's own default does)."""
    saved = {k: os.environ.get(k) for k in AUTH_ENV}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    try:
        import ray

        try:
            from ray._raylet import AuthenticationMode, Config  # noqa: F401 - absent before Ray 2.52
        except ImportError:
            raise EssaError(f"distributed: Ray {ray.__version__} cannot authenticate clients, so its local instance "
                            "would run code for anyone who reaches its ports; pip install -U \"ray>=2.52\"") from None
        Config.initialize("")
        if ray.is_initialized():
            raise EssaError("distributed: Ray is already initialized in this process; essa starts its own "
                            "private instance (distributed.address = \"\")")
        # address "local" starts a fresh instance even when RAY_ADDRESS names another cluster.
        ray.init(address="local", include_dashboard=False, logging_level="WARNING",
                 object_store_memory=OBJECT_STORE_BYTES)
        if not token_auth():
            ray.shutdown()
            raise EssaError("distributed: Ray started without token authentication; essa does not run an "
                            "unauthenticated instance")
    except BaseException:
        restore_env(saved)
        raise
    return ray, saved


def restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class RayEvaluator:
    """The population's chunks spread over Ray workers, re-run elsewhere when a worker is lost."""

    def __init__(self, recipe: Recipe, run_dir: Path, console: Console) -> None:
        cfg = recipe.distributed
        self.local, self.busy, self.chunkings = cfg.address in ("", "local"), False, {}
        self.console, self.recipe, self.saved_env = console, recipe, None
        if self.local:
            self.ray, self.saved_env = start_local()
            self.started = True
        else:
            import ray

            self.ray, self.started = ray, not ray.is_initialized()
            if self.started:
                try:
                    ray.init(address=cfg.address, include_dashboard=False, logging_level="WARNING")
                except (ConnectionError, ray.exceptions.AuthenticationError) as err:
                    reason = root_cause(err)
                    raise EssaError(f"distributed.address: cannot join the Ray cluster at {cfg.address} ({reason}); "
                                    "for a secured cluster, give essa its token (docs/distributed.md)") from None
            if not token_auth():
                console.print(f"[yellow]warning:[/] the Ray cluster at {cfg.address} runs without token "
                              "authentication: anyone who can reach its ports can run code on it "
                              "(docs/distributed.md, \"A secured cluster\")", highlight=False)
        try:
            self.workers = self._start(recipe.written, run_dir)
        except BaseException:
            self.close()
            raise
        self.space = SVDSpace.load(run_dir / SPACE_FILE)

    def _gpus(self) -> float:
        gpus = self.recipe.distributed.gpus_per_worker
        if gpus == "auto":
            return 1.0 if self.ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        return float(gpus)

    def _start(self, raw: dict, run_dir: Path) -> list:
        cfg, ray = self.recipe.distributed, self.ray
        gpus, path = self._gpus(), run_dir / SPACE_FILE
        # More than one GPU per worker: vLLM splits the model over them (tensor parallel).
        tensor_parallel = int(gpus) if gpus > 1 and self.recipe.run.engine == "vllm" else 1
        actor = ray.remote(Worker).options(num_cpus=cfg.cpus_per_worker, num_gpus=0 if tensor_parallel > 1 else gpus,
                                           max_restarts=0, scheduling_strategy="SPREAD")
        args = (raw, self.recipe.source, path.read_bytes() if path.exists() else None,
                reward_files(self.recipe.reward.name), max(1, math.floor(cfg.cpus_per_worker)), tensor_parallel)
        self.console.print(f"starting {cfg.workers} Ray workers ({cfg.cpus_per_worker:g} CPU, {gpus:g} GPU each) on "
                           f"{'a local Ray instance (token authentication)' if self.local else cfg.address}")
        workers = [self._actor(actor, tensor_parallel)]
        self.workers = workers
        space = self._get(workers[0].setup.remote(*args))  # the first worker builds the space when it is new
        if args[2] is None:
            path.write_bytes(space)
        workers += [self._actor(actor, tensor_parallel) for _ in range(cfg.workers - 1)]
        self._get([w.setup.remote(*args[:2], space, *args[3:]) for w in workers[1:]])
        self._warn_if_idle()
        return workers

    def _warn_if_idle(self) -> None:
        recipe = self.recipe
        rows = (recipe.strategy.population + 1) * recipe.data.prompts_per_iteration  # the members and their center
        chunks = math.ceil(rows / recipe.generation.batch_rows)
        if recipe.run.engine == "hf" and chunks < recipe.distributed.workers:
            self.console.print(f"[yellow]warning:[/] an iteration's {rows} rows make {chunks} chunk(s) of "
                               f"generation.batch_rows = {recipe.generation.batch_rows}, so only {chunks} of "
                               f"{recipe.distributed.workers} workers are busy; set generation.batch_rows to "
                               f"{math.ceil(rows / recipe.distributed.workers)} or less to use them all",
                               highlight=False)

    def _actor(self, actor: Any, tensor_parallel: int) -> Any:
        """A worker; with vLLM tensor parallel, in a placement group of its GPUs on one node, which
        vLLM's Ray executor finds and places its shards in (bundle 0 also holds the worker)."""
        if tensor_parallel == 1:
            return actor.remote()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cpus = self.recipe.distributed.cpus_per_worker
        group = placement_group([{"GPU": 1, "CPU": cpus}] + [{"GPU": 1}] * (tensor_parallel - 1),
                                strategy="STRICT_PACK")
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        return actor.options(scheduling_strategy=strategy).remote()

    def _get(self, refs: Any) -> Any:
        """ray.get, with a worker's own one-line error (bad model path, missing extra) raised as such."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, EssaError):
                raise EssaError(f"Ray worker: {err.cause}") from None
            raise

    def evaluate(self, candidates: np.ndarray, task: Task, keep_texts: bool = False,
                 on_chunk: OnChunk | None = None, on_rows: OnRows | None = None,
                 draft: int | None = None) -> Evaluation:
        """`on_rows` is not called: the rows of a chunk finish in a worker, which reports the chunk. `draft`
        is not used: workers decode undrafted, as a drafted chunk would wait for the draft's chunks."""
        start, ray = time.perf_counter(), self.ray
        candidates = np.asarray(candidates, dtype=np.float32).reshape(-1, self.space.dim)
        n = len(task.prompts)
        chunks = chunk_rows(len(candidates), task.lengths, self._chunking(n))
        task_ref = ray.put(task)
        results: list[ChunkResult | None] = [None] * len(chunks)
        pending, running, idle = collections.deque(range(len(chunks))), {}, list(self.workers)
        sent, received, lost, used = 0, 0, 0, set()
        self.busy = True
        if on_chunk:
            on_chunk(0, len(chunks))
        while pending or running:
            while pending and idle:
                worker, i = idle.pop(0), pending.popleft()
                payload = local_rows(candidates, chunks[i])
                running[worker.evaluate.remote(*payload, task_ref, keep_texts)] = (worker, i)
                sent, used = sent + wire_size(payload), used | {worker}
            [ref], _ = ray.wait(list(running), num_returns=1)
            worker, i = running.pop(ref)
            try:
                results[i] = self._get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                lost += 1
                self._lose(worker, err)
                pending.appendleft(i)
                continue
            received += wire_size(results[i])
            idle.append(worker)
            if on_chunk:
                on_chunk(sum(r is not None for r in results), len(chunks))
        self.busy = False
        evaluation = assemble(chunks, results, len(candidates), n, time.perf_counter() - start)
        evaluation.extra = {"bytes_sent": sent + wire_size(task) * len(used), "bytes_received": received,
                            "workers_lost": lost}
        return evaluation

    def _chunking(self, n_prompts: int) -> Chunking:
        """The engines' own chunking, asked of a live worker once per prompt count."""
        lost = (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError)
        while n_prompts not in self.chunkings:
            worker = self.workers[0]
            try:
                self.chunkings[n_prompts] = self._get(worker.chunking.remote(n_prompts))
            except lost as err:
                self._lose(worker, err)
        return self.chunkings[n_prompts]

    def _lose(self, worker: Any, err: Exception) -> None:
        self.workers.remove(worker)
        reason = str(err).strip().splitlines()[0][:160]
        if not self.workers:
            raise EssaError(f"every Ray worker is gone (the last: {reason}); the last checkpoint is intact: "
                            "rerun with --resume to continue")
        self.console.print(f"[yellow]warning:[/] a Ray worker was lost ({reason}); its chunk is evaluated again "
                           f"on the {len(self.workers)} remaining", highlight=False)

    def close(self) -> None:
        ray = self.ray
        for worker in getattr(self, "workers", []):
            if not self.busy:  # interrupted mid-evaluation: no waiting for chunks to finish first
                try:
                    ray.get(worker.close.remote(), timeout=10)
                except Exception:  # a dead or hung worker has nothing left to tidy; it is killed below
                    pass
            ray.kill(worker)
        if self.started:
            ray.shutdown()
        if self.saved_env is not None:
            restore_env(self.saved_env)
        # Killed workers could not tidy up; those of this node are gone now, so their scratch goes too.
        sweep("essa-worker")
        sweep("essa-adapters")

