"""The machine a figure was measured on, for the scripts' reports (`lscpu`'s model name)."""

from __future__ import annotations

import platform
import sys
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def script_report(script: str, argv: list[str] | None, **fields) -> dict:
    """A script's JSON report: `fields`, then the machine, torch's version and the command that made it."""
    import torch

    command = " ".join([f"python scripts/{script}", *(sys.argv[1:] if argv is None else argv)])
    return {**fields, "machine": platform.machine(), "torch": torch.__version__, "command": command}


def write_json(path: Path | None, report: dict) -> None:
    """A script's --json output, when asked for (its folder made as needed)."""
    if path is not None:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
