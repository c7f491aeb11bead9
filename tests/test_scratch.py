import os

from essa.scratch import make_scratch, scratch_root


def test_scratch_dirs_of_dead_processes_are_swept():
    dead = scratch_root() / "essa-adapters-999999999-test"
    (dead / "adapter-1").mkdir(parents=True, exist_ok=True)
    mine = make_scratch("essa-adapters")
    try:
        assert not dead.exists()
        assert mine.name.startswith(f"essa-adapters-{os.getpid()}-") and mine.parent == scratch_root()
        assert make_scratch("essa-adapters").exists() and mine.exists()  # a live process's directory is kept
    finally:
        for path in scratch_root().glob(f"essa-adapters-{os.getpid()}-*"):
            path.rmdir()
