"""`auto()`: the strategy that fits where the program runs.

The decision reads, in this order:

1. the cluster description in the environment
   (`keras_strategies.cluster.resolve_cluster`): parameter servers named ->
   `ParameterServer`; several training processes -> `MultiWorkerMirrored`;
2. only when there is no cluster, this machine's accelerators, found by the
   active backend (`keras_strategies.loader.local_accelerators`): a TPU ->
   `TPU`; more than one GPU -> `Mirrored`; else `Default`.

The cluster comes first so that nothing starts an engine before a
multi-process strategy has set it up (JAX's `jax.distributed.initialize()`
must run before its backend starts).

`choose()` makes the decision without creating the strategy; `auto()`
creates it and logs the decision once.
"""

import logging

from keras_strategies import loader
from keras_strategies.cluster import resolve_cluster
from keras_strategies.devices import parse_device
from keras_strategies.strategies import TPU, Default, Mirrored, MultiWorkerMirrored, ParameterServer

logger = logging.getLogger("keras_strategies")
_logged = set()  # the decisions already logged by this process


def choose(environ=None, devices=None):
    """Says which strategy `auto()` would create here, and why, creating nothing.

    Args:
        environ: a mapping of environment variables; `os.environ` when
            `None`.
        devices: this machine's accelerators as Keras names (e.g.
            `["gpu:0", "gpu:1"]`); found by the active backend when `None`.
            Looked at only when the environment describes no cluster.

    Returns:
        A tuple `(strategy_class, kwargs, reason)`: `strategy_class(**kwargs)`
        is the strategy, `reason` a sentence saying why it fits.

    Raises:
        ClusterError: the environment's cluster description is incomplete
            or contradicts itself.

    Example:
    >>> cls, kwargs, reason = choose({}, devices=["gpu:0", "gpu:1"])
    >>> cls.__name__, reason
    ('Mirrored', 'no cluster in the environment, and this machine has 2 GPUs (gpu:0, gpu:1)')
    """
    cluster = resolve_cluster(environ)
    if cluster.num_ps:
        workers = cluster.world_size - 1
        return ParameterServer, {"cluster": cluster}, (
            f"the environment ({cluster.source}) describes a chief, {workers} worker(s) "
            f"and {cluster.num_ps} parameter server(s)"
        )
    if cluster.world_size > 1:
        return MultiWorkerMirrored, {"cluster": cluster}, (
            f"the environment describes {cluster.world_size} processes ({cluster.source})"
        )
    found = loader.local_accelerators() if devices is None else list(devices)
    tpus = [d for d in found if parse_device(d)[0] == "tpu"]
    gpus = [d for d in found if parse_device(d)[0] == "gpu"]
    if tpus:
        return TPU, {}, f"no cluster in the environment, and this machine has {len(tpus)} TPU core(s)"
    if len(gpus) > 1:
        listed = ", ".join(gpus)
        return Mirrored, {}, f"no cluster in the environment, and this machine has {len(gpus)} GPUs ({listed})"
    if gpus:
        return Default, {}, "no cluster in the environment, and one GPU (Default trains on it)"
    return Default, {}, "no cluster in the environment, and no GPU or TPU on this machine"


def auto(environ=None, devices=None):
    """Returns the strategy that fits where the program runs.

    As Lightning's `strategy="auto"`: a cluster described in the environment
    (`TF_CONFIG`, torchrun's variables, `KERAS_DISTRIBUTION_*`, SLURM, see
    `resolve_cluster`) gives `ParameterServer` when it names parameter
    servers (TF_CONFIG's `"ps"` tasks, `KERAS_STRATEGIES_NUM_PS`) and
    `MultiWorkerMirrored` when it has several processes; otherwise a TPU gives
    `TPU()`, several GPUs `Mirrored()` (every local GPU), and anything else
    `Default()`. The first time a decision is made in a process it is logged
    (Python `logging`, logger `"keras_strategies"`, level INFO), e.g.
    `auto(): MultiWorkerMirrored: the environment describes 2 processes (torchrun)`.

    The devices are looked at only when the environment describes no cluster,
    so `auto()` works before a multi-process strategy starts its engine.
    On PyTorch, `Mirrored()` over several GPUs runs one process per GPU and
    starts the others from a plain `python train.py` itself (not from a
    notebook). CPU devices never count: on a CPU-only machine `auto()` is
    `Default()`; ask for `Mirrored(["cpu:0", "cpu:1"])` yourself.

    Args:
        environ: a mapping of environment variables; `os.environ` when
            `None`.
        devices: this machine's accelerators as Keras names (e.g.
            `["gpu:0", "gpu:1"]`), in place of what the backend finds.

    Returns:
        A new strategy: `ParameterServer`, `MultiWorkerMirrored`, `TPU`,
        `Mirrored` or `Default`.

    Raises:
        ClusterError: the environment's cluster description is incomplete
            or contradicts itself.

    Example:
    ```python
    import keras_strategies

    strategy = keras_strategies.auto()
    model.fit(x, y, batch_size=256, distribution=strategy)
    ```
    """
    strategy_class, kwargs, reason = choose(environ, devices)
    message = f"auto(): {strategy_class.__name__}: {reason}"
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
    return strategy_class(**kwargs)
