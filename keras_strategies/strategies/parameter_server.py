"""ParameterServer: asynchronous training, variables on parameter-server processes."""

from keras_strategies.cluster import NUM_PS_VARIABLE, resolve_cluster
from keras_strategies.errors import ClusterError
from keras_strategies.implementation.multi_process import default_timeout
from keras_strategies.strategies.base import Strategy


def _check_cluster(cluster):
    if not cluster.num_ps:
        raise ClusterError(
            "ParameterServer needs parameter-server processes, and this job names none: start it with "
            f"`keras-strategies launch --num-ps N ...`, set {NUM_PS_VARIABLE}=N (the last N processes "
            'are parameter servers), or list them under "ps" in TF_CONFIG.'
        )
    if cluster.task_type == "evaluator":
        raise ClusterError('ParameterServer has no "evaluator" task: evaluate on the chief instead.')
    if cluster.tf_cluster is not None and len(cluster.tf_cluster.get("chief", [])) != 1:
        raise ClusterError(
            'ParameterServer needs one "chief" task in TF_CONFIG (the coordinator that runs fit\'s loop): '
            'add "chief": ["host:port"] to "cluster".'
        )
    if cluster.world_size < 2:
        raise ClusterError("ParameterServer needs at least one worker besides the chief.")


class ParameterServer(Strategy):
    """Asynchronous data parallelism: workers compute gradients, parameter
    servers hold the variables and apply each update as it arrives.

    As `tf.distribute.experimental.ParameterServerStrategy` with its
    `ClusterCoordinator`. Three roles, one process each, all running the same
    script: the chief (it runs `fit`'s loop, the callbacks and the progress
    bar), the workers (each computes the gradients of one batch with the
    model's own Keras train step, against the variables as it reads them) and
    the parameter servers (they hold the variables, round-robin over the
    servers, with the optimizer's state, and apply each update with the
    model's own Keras optimizer, without waiting for other workers).

    - `batch_size` is the batch of one update (one worker's step): there is
      no global synchronous batch. `steps_per_epoch` is the number of updates
      per epoch over all workers; it is derived for arrays and datasets of
      known length, and required for an endless dataset (as in TensorFlow).
      Each worker reads its own pass over the input.
    - A worker or parameter server does its job inside the strategy or inside
      `fit`: a parameter server (and a worker on TensorFlow, a
      `tf.distribute.Server`) serves from the strategy's constructor on, and
      its script waits in its first `fit` (or at its end) for the chief; a
      worker on PyTorch and JAX computes updates inside its `fit`. Either way
      the process exits 0 on its own soon after the chief finishes, before
      any line after its `fit` runs; it prints no progress and writes no
      files. `role`, `is_chief`, `num_workers` and `worker_index` (the index
      within the role) work on every process.
    - After `fit` the chief's model holds the servers' final values:
      `evaluate`, `predict` and `save` work on the chief (and
      `evaluate`/`predict` with `distribution=` run there too).
    - A worker that dies: its unfinished update is given to another worker
      and `fit` goes on with the rest; a worker restarted with the same role
      joins again. A parameter server that dies ends every process with a
      `WorkerError` naming it; a chief that dies ends the others.
    - `History` and the progress line report `staleness`: the mean number of
      updates other workers applied between a worker's read of the variables
      and its own update (`max_staleness`: the largest).

    Engines: TensorFlow's `ParameterServerStrategy` + `ClusterCoordinator`;
    on PyTorch and JAX, `torch.distributed.rpc` (for JAX: `pip install
    keras-strategies[parameter-server]`).

    Args:
        cluster: a `keras_strategies.cluster.ClusterSpec` naming a chief,
            workers and parameter servers; read from the environment when
            `None` (`TF_CONFIG` with "chief", "worker" and "ps" tasks, or
            any other source plus `KERAS_STRATEGIES_NUM_PS`, which
            `keras-strategies launch --num-ps N` sets).
        timeout: seconds to wait for a peer (to join, to answer) before
            failing with a `WorkerError`. Defaults to
            `KERAS_STRATEGIES_TIMEOUT`, else 1800.

    Attributes:
        cluster: the `ClusterSpec` this process runs with (its role:
            `cluster.task_type`).
        timeout: the seconds it waits for a peer.

    Returns:
        A strategy; on the chief, usable as `fit(..., distribution=strategy)`
        or with `strategy.scope()`.

    Example:
    ```python
    # train.py, started by: keras-strategies launch --nproc-per-node 4 --num-ps 1 train.py
    strategy = keras_strategies.ParameterServer()
    model = build(); model.compile(optimizer=keras.optimizers.SGD(0.05), loss=...)
    model.fit(x, y, batch_size=32, epochs=8, distribution=strategy)
    model.evaluate(x_test, y_test)  # on the chief
    ```
    """

    _family = "parameter_server"

    def __init__(self, cluster=None, timeout=None):
        cluster = resolve_cluster() if cluster is None else cluster
        _check_cluster(cluster)
        self.cluster = cluster
        self.timeout = float(timeout) if timeout is not None else default_timeout()
        super().__init__(None, cluster=cluster, timeout=self.timeout)

    @property
    def num_ps(self):
        """The number of parameter servers."""
        return self._impl.num_ps

    @property
    def steps_by_worker(self):
        """On the chief: how many updates each worker computed, by worker index."""
        return dict(self._impl.steps_by_worker)

    def updates_applied(self):
        """On the chief: the updates the parameter servers have applied."""
        return self._impl.updates_applied()

    def variables_by_server(self, model):
        """On the chief: the paths of the variables each parameter server
        holds, asked of the servers (one list per server)."""
        return self._impl.variables_by_server(model)

    def __repr__(self):
        return (
            f"ParameterServer(backend={self._backend!r}, role={self.role!r}, "
            f"index={self.worker_index}, workers={self.num_workers}, ps={self.num_ps})"
        )
