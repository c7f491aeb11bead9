"""The clean-tree check (tests/clean_tree.py) fails a run that writes into the working tree, and only such a run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_suite(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """A one-test suite in a git checkout of its own, run with the plugin."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "test_one.py").write_text(f"from pathlib import Path\n\ndef test_one():\n    {body}\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "test_one.py"], check=True)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.clean_tree", "-p", "no:cacheprovider",
                           "test_one.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})


def test_a_suite_that_writes_into_the_tree_fails_naming_the_file(tmp_path):
    proc = run_suite(tmp_path, "Path('mlruns').mkdir(); Path('mlruns/meta.yaml').write_text('x')")
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, proc.stdout + proc.stderr
    assert "the test suite changed the working tree" in proc.stdout and "?? mlruns/meta.yaml" in proc.stdout


def test_a_suite_that_leaves_the_tree_alone_passes(tmp_path):
    proc = run_suite(tmp_path, "assert True")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "changed the working tree" not in proc.stdout
