import numpy as np

from essa import checkpoint
from essa.checkpoint import Checkpoint


def make(iteration: int) -> Checkpoint:
    return Checkpoint(iteration, {"center": np.full(3, float(iteration))}, {"best_reward": 0.5})


def test_save_keeps_the_newest_and_round_trips(tmp_path):
    for i in range(1, 5):
        checkpoint.save(tmp_path, make(i), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-000003", "iter-000004"]
    ckpt, skipped = checkpoint.latest(tmp_path)
    assert ckpt.iteration == 4 and not skipped
    assert np.array_equal(ckpt.arrays["center"], np.full(3, 4.0)) and ckpt.meta["best_reward"] == 0.5


def test_partial_and_leftover_writes_are_skipped(tmp_path):
    checkpoint.save(tmp_path, make(1), keep=3)
    checkpoint.save(tmp_path, make(2), keep=3)
    (tmp_path / "iter-000002" / "meta.json").unlink()  # killed between the two files of a copy
    (tmp_path / ".tmp-iter-000003").mkdir()  # killed before the rename
    ckpt, skipped = checkpoint.latest(tmp_path)
    assert ckpt.iteration == 1 and [p.name for p in skipped] == ["iter-000002"]


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path / "none") == (None, [])
