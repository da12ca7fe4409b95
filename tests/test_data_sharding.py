"""How input is split between workers (backend-neutral, no processes)."""

import numpy as np
import pytest

import keras_strategies as ks
from conftest import BACKEND
from keras_strategies.implementation import data

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)


def test_chunks_make_up_the_global_batch_in_rank_order():
    for world in (1, 2, 3, 4):
        for size in range(world, 40):
            bounds = [data.chunk_bounds(size, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_each_example_once_per_epoch_in_order_and_same_step_count():
    n, batch, world = 69, 16, 2
    x = np.arange(n, dtype="float32")[:, None]
    shards = [data.shard_input(x, np.arange(n), None, batch, False, r, world, "MultiWorkerMirrored(...)")[0]
              for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 5
    batches = [[s[i] for i in range(len(s))] for s in shards]
    # step i of every worker makes up global batch i, in rank order
    seen = [int(v) for i in range(5) for r in range(world) for v in batches[r][i][1]]
    assert seen == list(range(n))
    assert all(np.array_equal(b[0][:, 0], b[1]) for part in batches for b in part)


def test_an_unshuffled_share_is_views_of_the_input_not_a_copy():
    """A worker's share of in-memory arrays was copied whole before each fit
    (peak memory 1.11x the hand-written DDP loop's on 2 processes)."""
    x = np.random.default_rng(0).random((64, 3), dtype="float32")
    y = np.arange(64)
    weights = np.ones(64, "float32")
    shard, *_ = data.shard_input(x, y, weights, 16, False, 1, 2, "MultiWorkerMirrored(...)")
    bx, by, bw = shard[2]
    np.testing.assert_array_equal(bx, x[40:48])
    assert np.shares_memory(bx, x) and np.shares_memory(by, y) and np.shares_memory(bw, weights)


@pytest.mark.skipif(BACKEND != "torch", reason="the torch backend's batch conversion (backends/torch/base.py)")
def test_torch_batches_share_the_input_and_keep_the_dtype_keras_gives_them():
    """Keras's torch convert_to_tensor copied every numpy batch (np.array)
    before torch saw it; a tensor sharing the input's memory passes through."""
    import torch
    from keras.src.backend.torch.core import convert_to_tensor

    from keras_strategies.backends.torch.base import host_tensor

    x = np.random.default_rng(0).random((64, 3), dtype="float32")
    y = np.arange(64, dtype="int32")
    shard, *_ = data.shard_input(x, y, None, 16, False, 1, 2, "MultiWorkerMirrored(...)", convert=host_tensor)
    bx, by = shard[2]
    assert isinstance(bx, torch.Tensor) and isinstance(by, torch.Tensor)
    for batch, source in ((bx, x), (by, y)):
        converted = convert_to_tensor(batch)
        assert np.shares_memory(converted.numpy(), source)
        assert converted.dtype == convert_to_tensor(np.array(source[:1])).dtype
    np.testing.assert_array_equal(bx.numpy(), x[40:48])
    read_only = x.copy()
    read_only.flags.writeable = False
    for kept in (read_only, x[::-1], x.astype("uint32")):  # Keras converts these itself
        assert host_tensor(kept) is kept


def test_global_shuffle_changes_every_epoch_and_covers_everything():
    x = np.arange(69, dtype="float32")[:, None]
    y = np.arange(69)
    shards = [data.ShuffledShards(x, y, None, 16, r, 2, seed=7) for r in range(2)]

    def epoch():
        seen = [int(v) for s in shards for i in range(len(s)) for v in s[i][1]]
        for s in shards:
            s.on_epoch_end()
        return seen

    first, second = epoch(), epoch()
    assert sorted(first) == sorted(second) == list(range(69))
    assert first != second


def test_too_few_examples_in_the_last_batch_is_a_clear_error():
    with pytest.raises(ks.StrategyError, match="last global batch has 1 example"):
        data.check_splittable(65, 16, 2, "MultiWorkerMirrored(...)")


def test_indivisible_global_batch_is_a_clear_error():
    x = np.zeros((32, 2), "float32")
    with pytest.raises(ks.StrategyError, match="batch_size=5 .* not a multiple of the 2 workers"):
        data.shard_input(x, None, None, 5, False, 0, 2, "MultiWorkerMirrored(...)")
