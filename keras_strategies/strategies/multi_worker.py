"""MultiWorkerMirrored: synchronous data parallelism across processes.

What every multi-process strategy does the same way on every backend (the
cluster, chief-only callbacks, the watchdog, lost peers) is in
`keras_strategies.implementation.multi_process`; how each engine does it is in
`keras_strategies.backends.<backend>.multi_worker`.
"""

from keras_strategies.cluster import resolve_cluster
from keras_strategies.implementation.multi_process import default_timeout
from keras_strategies.strategies.base import Strategy


class MultiWorkerMirrored(Strategy):
    """Synchronous data parallelism over worker processes on one or more machines.

    Each process holds one replica per local device (one per process on a
    CPU); every step all-reduces the gradients over all replicas of all
    processes, so training equals one device on the global batch.

    The cluster is read from the environment: `TF_CONFIG`, torchrun's
    variables, `KERAS_DISTRIBUTION_*` or SLURM (see
    `keras_strategies.cluster.resolve_cluster`). Start the processes with
    `keras-strategies launch --nproc-per-node N train.py`, torchrun, srun, or
    by hand with a `TF_CONFIG` each.

    Args:
        cluster: a `keras_strategies.cluster.ClusterSpec`; read from the
            environment when `None`.
        timeout: seconds to wait for a peer (a collective, the rendezvous)
            before failing with a clear error. Defaults to the
            `KERAS_STRATEGIES_TIMEOUT` environment variable, else 1800. A
            peer that died or hung ends every other worker with a
            `keras_strategies.WorkerError`; where the engine waits inside
            native code that no exception can interrupt (JAX's gloo
            collectives), the worker prints that error and exits with code 75
            instead, which `except WorkerError` cannot catch.

    Attributes:
        cluster: the `ClusterSpec` this process runs with.
        timeout: the seconds it waits for a peer.

    Example:
    ```python
    # train.py, started by: keras-strategies launch --nproc-per-node 2 train.py
    model.fit(x, y, batch_size=256, distribution=keras_strategies.MultiWorkerMirrored())
    ```
    """

    _family = "multi_worker"

    def __init__(self, cluster=None, timeout=None):
        if cluster is None:
            cluster = resolve_cluster()
        self.cluster = cluster
        self.timeout = float(timeout) if timeout is not None else default_timeout()
        super().__init__(None, cluster=self.cluster, timeout=self.timeout)

    def __repr__(self):
        return (
            f"MultiWorkerMirrored(backend={self._backend!r}, devices={self.devices}, "
            f"worker={self.worker_index}/{self.num_workers})"
        )
