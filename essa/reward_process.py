"""Reward code runs in a child process with hard limits on time and memory.

A thread cannot be stopped: a reward that never returns (a user's `sleep`, math-verify expanding
`2^2^2^2^2^2^2^2`) kept its thread, hung the run and was joined at exit. A child process can be
killed, and an address-space limit (`RLIMIT_AS`) turns a runaway allocation into a MemoryError
there instead of an out-of-memory kill of the run. The parent never imports a user's reward
module: the child resolves `module:function` / `file.py:function` specs itself, so a module that
hangs or exits at import is bounded the same way.

The child is a fresh `python -m essa.reward_process` (about 0.5 s to start), not a
multiprocessing child: spawn and forkserver re-run the caller's `__main__` in the child, and fork
would copy the parent's torch threads. It talks over two pipes of its own, so a reward that prints
cannot corrupt the protocol (its stdout goes to essa's stderr).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import inspect
import resource
import signal
import subprocess
import sys
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

from essa.errors import EssaError

PICKLED = ".pkl"


class RewardFailure(Exception):
    """One reward call failed: it raised, returned the wrong shape, timed out or crashed its process."""


def builtin_names() -> list[str]:
    from essa.rewards import REGISTRY

    return sorted(REGISTRY)


def load_function(spec: str) -> Any:
    """A built-in reward, `package.module:function`, `path/to/file.py:function` or a callable pickled
    to `path/to/file.pkl` (essa.align's reward_funcs); a helper such as
    `essa.rewards.ifeval:instruction_verdicts` is named the same way. Runs in the child."""
    from essa.rewards import REGISTRY

    if spec in REGISTRY:
        return REGISTRY[spec]
    if spec.endswith(PICKLED):
        import cloudpickle

        return cloudpickle.loads(Path(spec).expanduser().read_bytes())
    module_name, _, function = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        loader_spec = importlib.util.spec_from_file_location(f"essa_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = import_module(module_name)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise LookupError(f"{module_name!r} has no function {function!r}")
    return fn


def import_module(name: str) -> Any:
    """A module by name. Run directories saved before essa's task package moved inside essa (it was a
    top-level `rewards`, 2026-12-06) name `rewards.MODULE`: where no such package exists, those resolve
    to `essa.rewards.MODULE`, so they still resume."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != "rewards" or not name.startswith("rewards."):
            raise
        return importlib.import_module(f"essa.{name}")


def check_spec(spec: str, field: str = "reward.name") -> None:
    """What can be said of a reward name without running its code (the child imports it)."""
    if spec in builtin_names():
        return
    if spec.endswith(PICKLED):
        if not Path(spec).expanduser().is_file():
            raise EssaError(f"{field}: pickled reward {spec!r} not found")
        return
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise EssaError(f"{field}: unknown reward {spec!r}; built-in: {', '.join(builtin_names())}; "
                        "or 'package.module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py") and not Path(module_name).expanduser().is_file():
        raise EssaError(f"{field}: file {module_name!r} not found")


def by_name(fn: Any) -> bool:
    """TRL calls a reward by keyword (`f(completions, **kwargs)` is a valid TRL reward); a function that
    names a `completions` parameter gets prompts and completions by name, any other positionally."""
    return "completions" in inspect.signature(fn).parameters


def call(fn: Any, prompts: list[str], completions: list[str], columns: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    if by_name(fn):
        return fn(prompts=prompts, completions=completions, **columns, **kwargs)
    return fn(prompts, completions, **columns, **kwargs)


def signature_problem(spec: str, fn: Any, kwargs: dict[str, Any], columns: list[str] | None) -> str | None:
    """What stops the call of `fn` with prompts, completions, **columns and **kwargs before it runs: an
    option it does not take (a built-in takes every option by name; its `**_` only absorbs dataset
    columns), or a required argument that neither a dataset column (when known) nor an option provides."""
    params = inspect.signature(fn).parameters
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    named = [n for n in named if n not in ("prompts", "completions")] if by_name(fn) else named[2:]
    catch_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if key not in named and (spec in builtin_names() or not catch_all):
            return f"reward.kwargs: {key!r} is not an option of {spec} (options: {', '.join(named) or 'none'})"
    if columns is not None:
        required = [n for n in named if params[n].default is params[n].empty]
        missing = [n for n in required if n not in columns and n not in kwargs]
        if missing:
            return (f"data.columns: reward {spec} needs column {missing[0]!r}, which the data does not have "
                    f"(columns: {', '.join(columns) or 'none'}); map one with data.columns.{missing[0]} = \"COLUMN\"")
    return None


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when essa ends, so a child stuck in C code never outlives a killed run."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(requests: Connection, replies: Connection, memory_bytes: int) -> None:
    """The child's loop: (sys.path) once, then ("check" | "call", spec, payload) in, ("ok" | "error", value) out."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    functions: dict[str, Any] = {}
    try:
        sys.path[:] = requests.recv()  # `package.module:function` resolves as it would in essa
    except (EOFError, OSError):
        return
    while True:
        try:
            op, spec, payload = requests.recv()
        except (EOFError, OSError):
            return
        try:
            if spec not in functions:
                functions[spec] = load_function(spec)
            fn = functions[spec]
            if op == "check":
                reply: Any = signature_problem(spec, fn, *payload)
            else:
                prompts, completions, columns, kwargs = payload
                reply = list(call(fn, prompts, completions, columns, kwargs))
            replies.send(("ok", reply))
        except BaseException as err:  # noqa: BLE001 - SystemExit and friends from user code are data too
            message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            try:
                replies.send(("error", f"{type(err).__name__}: {message}" if message else type(err).__name__))
            except Exception:  # the reply itself failed to pickle or the pipe is gone
                return


class RewardProcess:
    """One child at a time; replaced after a timeout or a crash."""

    def __init__(self, timeout_s: float, memory_gb: float) -> None:
        self.timeout_s, self.memory_bytes = timeout_s, int(memory_gb * 2**30)
        self.process: subprocess.Popen | None = None
        self.requests: Connection | None = None
        self.replies: Connection | None = None

    def _start(self) -> None:
        replies, child_replies = Pipe(duplex=False)
        child_requests, requests = Pipe(duplex=False)
        fds = (child_requests.fileno(), child_replies.fileno())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "essa.reward_process", *map(str, fds), str(self.memory_bytes)],
            pass_fds=fds, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno() if _has_fileno() else None)
        child_requests.close()
        child_replies.close()
        self.requests, self.replies = requests, replies

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.requests.close()
            self.replies.close()
        self.process = self.requests = self.replies = None

    def _request(self, op: str, spec: str, payload: Any) -> Any:
        fresh = self.process is None
        if fresh:
            self._start()
        try:
            if fresh:
                self.requests.send(sys.path)
            self.requests.send((op, spec, payload))
            ready = self.replies.poll(self.timeout_s)
            status, value = self.replies.recv() if ready else ("timeout", None)
        except (EOFError, OSError):
            status, value = "died", None
        if status == "ok":
            return value
        if status == "error":
            raise RewardFailure(value)
        exitcode = self.process.poll()
        self.close()
        if status == "timeout":
            raise RewardFailure(f"no result within reward.timeout_s = {self.timeout_s:g} s (stopped)")
        raise RewardFailure(f"the reward process died (exit code {exitcode}; over reward.memory_gb?)")

    def check(self, spec: str, kwargs: dict[str, Any], columns: list[str] | None = None,
              field: str = "reward.name") -> None:
        """Import the function `spec` names (the recipe's `field`) in the child and check its options (and
        the dataset columns it needs, when given); EssaError when it cannot run."""
        check_spec(spec, field)
        try:
            problem = self._request("check", spec, (kwargs, columns))
        except RewardFailure as err:
            raise EssaError(f"{field}: cannot load {spec!r} ({err})") from None
        if problem:
            raise EssaError(problem)

    def call(self, spec: str, prompts: list[str], completions: list[str], columns: dict[str, list],
             kwargs: dict[str, Any]) -> list:
        return self._request("call", spec, (prompts, completions, columns, kwargs))


def _has_fileno() -> bool:
    try:
        sys.stderr.fileno()
        return True
    except (AttributeError, OSError, ValueError):  # pytest's captured stderr has none
        return False


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False),
           int(sys.argv[3]))
