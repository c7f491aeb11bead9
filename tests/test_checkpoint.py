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


def test_arrays_keep_their_shape_dtype_and_layout(tmp_path):
    arrays = {"scalar": np.array(3), "float": np.array(0.25), "transposed": np.arange(6.0).reshape(2, 3).T,
              "keys": np.arange(4, dtype=np.uint32)}
    checkpoint.save(tmp_path, Checkpoint(1, arrays, {}), keep=1)
    loaded = checkpoint.latest(tmp_path)[0].arrays
    for name, array in arrays.items():
        assert loaded[name].shape == array.shape and loaded[name].dtype == array.dtype
        assert np.array_equal(loaded[name], array)


def test_partial_and_leftover_writes_are_skipped(tmp_path):
    checkpoint.save(tmp_path, make(1), keep=3)
    checkpoint.save(tmp_path, make(2), keep=3)
    (tmp_path / "iter-000002" / "meta.json").unlink()  # killed between the two files of a copy
    (tmp_path / ".tmp-iter-000003").mkdir()  # killed before the rename
    ckpt, skipped = checkpoint.latest(tmp_path)
    assert ckpt.iteration == 1 and [p.name for p in skipped] == ["iter-000002"]


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path / "none") == (None, [])
