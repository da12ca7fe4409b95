"""Splitting the input of fit/evaluate between worker processes.

Written once for every backend that feeds each worker its own part of the
data. Worker `r` of `W` gets, of every global batch of `n` examples, the
contiguous chunk `[n*r//W, n*(r+1)//W)`: the global batch is the workers'
chunks in rank order, each example is seen once per epoch, and every worker
runs the same number of steps (no hang on uneven data).
"""

import math

import keras
import numpy as np

from keras_strategies.errors import StrategyError


def shuffle_seed():
    """The seed every worker shuffles with: Keras's global seed when set
    (`keras.utils.set_random_seed`, the same on every worker), else 0."""
    from keras.src.utils import rng_utils

    seed = rng_utils.get_random_seed()
    return 0 if seed is None else int(seed)


def fit_seed(method, arguments, broadcast_bytes=None):
    """The shuffle seed of one call under a strategy.

    A `fit` that shuffles arrays draws a new seed from numpy's global
    generator, as Keras's own shuffles draw from the global random state:
    each fit shuffles anew, and the same again after
    `keras.utils.set_random_seed`. Across processes every worker draws (each
    generator moves alike) and the chief's seed is sent to all, so that every
    worker shuffles alike. A resumed fit shuffles with the seed its backup
    recorded instead (`resume.ExactBackup`). Any other call gets
    `shuffle_seed()`, and numpy's generator is left as it is.

    Args:
        method: `"fit"`, `"evaluate"` or `"predict"`.
        arguments: the call's `inspect.BoundArguments` (read only).
        broadcast_bytes: the chief's bytes on every worker (a collective
            every worker calls), or None in one process.

    Returns:
        A non-negative int, the seed for `epoch_order`.

    Example:

    >>> keras.utils.set_random_seed(3)
    >>> a = fit_seed("fit", inspect.signature(model.fit).bind(x, y))
    >>> keras.utils.set_random_seed(3)
    >>> a == fit_seed("fit", inspect.signature(model.fit).bind(x, y))
    True
    """
    a = arguments.arguments
    if method != "fit" or a.get("shuffle", True) is not True or not is_array_like(a.get("x")):
        return shuffle_seed()
    seed = int(np.random.randint(2**31 - 1))
    if broadcast_bytes is not None:
        seed = int.from_bytes(broadcast_bytes(seed.to_bytes(8, "little")), "little")
    return seed


def chunk_bounds(size, rank, world):
    """The `[start, stop)` of worker `rank`'s chunk of a batch of `size`."""
    return size * rank // world, size * (rank + 1) // world


def is_array_like(x):
    """Whether `x` (or its first leaf) is an in-memory array Keras batches itself."""
    if x is None:
        return False
    leaves = keras.tree.flatten(x)
    if not leaves:
        return False
    leaf = leaves[0]
    return isinstance(leaf, np.ndarray) or (
        hasattr(leaf, "shape") and hasattr(leaf, "dtype") and hasattr(leaf, "__len__")
    )


def num_examples(x):
    """How many examples the arrays `x` (any nest) hold."""
    return int(keras.tree.flatten(x)[0].shape[0])


def take(structure, indices, convert=None):
    """`structure`'s leaves indexed by `indices`, each passed to `convert` if given."""
    if structure is None:
        return None
    if convert is None:
        return keras.tree.map_structure(lambda a: np.asarray(a)[indices], structure)
    return keras.tree.map_structure(lambda a: convert(np.asarray(a)[indices]), structure)


def check_splittable(num_examples, global_batch, world, strategy):
    """Every worker needs at least one example of every global batch."""
    last = num_examples % global_batch or global_batch
    if min(global_batch, last) < world:
        raise StrategyError(
            f"{strategy!r}: the last global batch has {last} example(s), fewer "
            f"than the {world} workers, so some worker would have nothing to "
            f"compute. Use a batch_size that leaves at least {world} examples "
            "in the last batch, or drop the few trailing examples."
        )


def _host_arrays(structure):
    """`structure`'s leaves as numpy arrays (numpy ones as they are, no copy)."""
    if structure is None:
        return None
    return keras.tree.map_structure(np.asarray, structure)


def epoch_order(num_examples, seed, epoch):
    """The order of the examples in epoch `epoch` of a shuffled `fit`: a
    permutation drawn from `(seed, epoch)`, the same on every worker and in a
    resumed run.

    Args:
        num_examples: how many examples the input has.
        seed: the shuffle seed (`shuffle_seed()`).
        epoch: the training epoch (from 0).

    Returns:
        An int64 numpy array, a permutation of `range(num_examples)`.
    """
    return np.random.default_rng((int(seed), int(epoch))).permutation(num_examples)


class ShuffledShards(keras.utils.PyDataset):
    """One worker's share of in-memory arrays, reshuffled globally each epoch.

    Every worker draws the same permutation (seeded by `seed` and the epoch),
    so together they still see each example once per epoch. With
    `shuffle=False` the examples keep their order and each batch is a slice
    of the arrays given (a view: the worker's share is never copied whole).
    `convert`, if given, is applied to each array of each batch (a backend's
    conversion to its own tensors).
    """

    def __init__(self, x, y, sample_weight, global_batch, rank, world, seed, shuffle=True, convert=None):
        super().__init__()
        self.convert = convert
        self.x, self.y, self.sample_weight = (_host_arrays(a) for a in (x, y, sample_weight))
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.seed, self.epoch, self.shuffle = seed, 0, shuffle
        self.n = num_examples(x)
        self._reindex()

    def _reindex(self):
        self.order = epoch_order(self.n, self.seed, self.epoch) if self.shuffle else None

    def __len__(self):
        return math.ceil(self.n / self.global_batch)

    def __getitem__(self, index):
        start = index * self.global_batch
        size = min(self.global_batch, self.n - start)
        lo, hi = chunk_bounds(size, self.rank, self.world)
        idx = slice(start + lo, start + hi) if self.order is None else self.order[start + lo:start + hi]
        x, y, weights = (take(a, idx, self.convert) for a in (self.x, self.y, self.sample_weight))
        if weights is not None:
            return x, y, weights
        return (x, y) if y is not None else (x,)

    def on_epoch_end(self):
        self.epoch += 1
        self._reindex()

    def set_epoch(self, epoch):
        """Draws epoch `epoch`'s order (with the current `seed`): a run
        resumed from a backup sees the order the interrupted one saw.

        Args:
            epoch: the training epoch about to start (from 0).
        """
        self.epoch = epoch
        self._reindex()


class BatchChunks(keras.utils.PyDataset):
    """Worker `rank`'s chunk of each batch of a batched `PyDataset`."""

    def __init__(self, dataset, rank, world):
        super().__init__()
        self.dataset, self.rank, self.world = dataset, rank, world

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return chunk_batch(self.dataset[index], self.rank, self.world)

    def on_epoch_end(self):
        self.dataset.on_epoch_end()


def chunk_batch(batch, rank, world):
    """Worker `rank`'s chunk of one batch (any nest of arrays or tensors)."""
    size = int(keras.tree.flatten(batch)[0].shape[0])
    lo, hi = chunk_bounds(size, rank, world)
    return keras.tree.map_structure(lambda t: t[lo:hi], batch)


def shard_input(x, y, sample_weight, batch_size, shuffle, rank, world, strategy, seed=0, convert=None):
    """This worker's part of `fit`/`evaluate` input.

    Args:
        x, y, sample_weight: as given to Keras.
        batch_size: the global batch size (Keras's default 32 when `None`).
        shuffle: whether to reshuffle arrays every epoch.
        rank, world: this worker and the number of workers.
        strategy: used in error messages.
        seed: the shuffle seed, the same on every worker.
        convert: applied to each array of each batch of in-memory arrays
            (`ShuffledShards`), or None.

    Returns:
        `(x, y, sample_weight, batch_size, shuffle)` to hand to Keras.
    """
    if is_array_like(x):
        global_batch = batch_size or 32
        if global_batch % world:
            raise StrategyError(
                f"{strategy!r}: batch_size={global_batch} (the global batch) is "
                f"not a multiple of the {world} workers. Use a multiple of {world}."
            )
        n = num_examples(x)
        check_splittable(n, global_batch, world, strategy)
        data = ShuffledShards(x, y, sample_weight, global_batch, rank, world, seed,
                              shuffle=bool(shuffle) and shuffle != "batch", convert=convert)
        return data, None, None, None, False
    if isinstance(x, keras.utils.PyDataset):
        return BatchChunks(x, rank, world), y, sample_weight, batch_size, shuffle
    chunked = _chunk_framework_dataset(x, rank, world)
    if chunked is not None:
        return chunked, y, sample_weight, batch_size, shuffle
    raise StrategyError(
        f"{strategy!r} cannot split input of type {type(x).__name__} between "
        "workers; use numpy arrays, a tf.data.Dataset, a keras.utils.PyDataset "
        "or a torch DataLoader."
    )


def _chunk_framework_dataset(x, rank, world):
    module = type(x).__module__
    if module.startswith("tensorflow"):
        import tensorflow as tf

        if isinstance(x, tf.data.Dataset):

            def chunk(*batch):
                size = tf.shape(tf.nest.flatten(batch)[0])[0]
                lo, hi = size * rank // world, size * (rank + 1) // world
                out = tf.nest.map_structure(lambda t: t[lo:hi], batch)
                return out if len(out) > 1 else out[0]

            return x.map(chunk)
    if module.startswith("torch"):
        import torch

        if isinstance(x, torch.utils.data.DataLoader):

            class Chunks(torch.utils.data.IterableDataset):
                def __iter__(self):
                    for batch in x:
                        yield chunk_batch(batch, rank, world)

                def __len__(self):
                    return len(x)

            return torch.utils.data.DataLoader(Chunks(), batch_size=None)
    return None


def shard_call(method, arguments, rank, world, strategy, seed=0, convert=None):
    """Rewrites a fit/evaluate call so this worker gets its part of the data.

    `predict` is left whole: every worker predicts every example, so each
    returns all predictions in input order.

    Args:
        method: `"fit"`, `"evaluate"` or `"predict"`.
        arguments: the call's `inspect.BoundArguments` (changed in place).
        rank, world: this worker and the number of workers.
        strategy: used in error messages.
        seed: the shuffle seed, the same on every worker.
        convert: see `shard_input`.

    Returns:
        The same `arguments`.
    """
    if method == "predict" or world == 1:
        return arguments
    from keras.src.trainers.data_adapters import data_adapter_utils

    a = arguments.arguments
    if method == "fit":
        split_validation(arguments)
    x, y, weights = a.get("x"), a.get("y"), a.get("sample_weight")
    global_batch = a.get("batch_size")
    shuffle = a.get("shuffle", True) if method == "fit" else False
    x, y, weights, batch, shuffle = shard_input(
        x, y, weights, global_batch, shuffle, rank, world, strategy, seed, convert
    )
    a["x"], a["y"], a["sample_weight"], a["batch_size"] = x, y, weights, batch
    if method == "fit":
        a["shuffle"] = shuffle
        validation = a.get("validation_data")
        if validation is not None:
            if isinstance(validation, (tuple, list)):
                vx, vy, vw = data_adapter_utils.unpack_x_y_sample_weight(tuple(validation))
            else:
                vx, vy, vw = validation, None, None
            vbatch = a.get("validation_batch_size") or global_batch
            vx, vy, vw, vbatch, _ = shard_input(vx, vy, vw, vbatch, False, rank, world, strategy, convert=convert)
            a["validation_data"] = data_adapter_utils.pack_x_y_sample_weight(vx, vy, vw)
            if not is_array_like(vx) and not isinstance(vx, tuple):
                a["validation_data"] = vx
            a["validation_batch_size"] = vbatch
    return arguments


def shard_predict(arguments, rank, world):
    """Worker `rank`'s contiguous part of `predict`'s array input, and the
    per-worker batch size (`batch_size` is the global batch). Other inputs
    are left whole (every worker predicts every example).

    Args:
        arguments: the call's `inspect.BoundArguments` (changed in place).
        rank, world: this worker and the number of workers.

    Returns:
        The number of examples of the whole input when it was split, else `None`.
    """
    a = arguments.arguments
    x = a.get("x")
    if not is_array_like(x):
        return None
    n = num_examples(x)
    lo, hi = chunk_bounds(n, rank, world)
    a["x"] = take(x, slice(lo, hi))  # a view: no copy of the input
    a["batch_size"] = max(1, (a.get("batch_size") or 32) // world)
    return n


def split_validation(arguments):
    """`fit(validation_split=...)` on arrays, done before the input is rewritten
    (Keras cannot split a dataset): the last fraction, as Keras does."""
    from keras.src.trainers.data_adapters import array_slicing

    a = arguments.arguments
    if not a.get("validation_split") or a.get("validation_data") is not None:
        return
    if is_array_like(a.get("x")):
        (a["x"], a["y"], a["sample_weight"]), a["validation_data"] = (
            array_slicing.train_validation_split(
                (a.get("x"), a.get("y"), a.get("sample_weight")),
                validation_split=a["validation_split"],
            )
        )
    a["validation_split"] = 0.0


def shuffle_globally(method, arguments, seed=0):
    """`fit(shuffle=True)` on arrays when every worker reads the whole input
    (TensorFlow, JAX): the global batches come in one order shared by every
    worker, new each epoch. Left to each worker, Keras would shuffle with each
    worker's own random state, and the workers' slices of a global batch would
    then miss some examples and repeat others.

    Args:
        method: `"fit"`, `"evaluate"` or `"predict"`; only fit shuffles.
        arguments: the call's `inspect.BoundArguments` (changed in place).
        seed: the shuffle seed, the same on every worker.

    Returns:
        The same `arguments`.
    """
    a = arguments.arguments
    if method != "fit":
        return arguments
    split_validation(arguments)
    shuffle = a.get("shuffle", True)
    if not shuffle or shuffle == "batch" or not is_array_like(a.get("x")):
        return arguments
    a["x"] = ShuffledShards(
        a["x"], a.get("y"), a.get("sample_weight"), a.get("batch_size") or 32, 0, 1, seed
    )
    a["y"] = a["sample_weight"] = a["batch_size"] = None
    a["shuffle"] = False
    return arguments
