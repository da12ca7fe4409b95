"""Starting this machine's ranks of a job: their environments and `launch()`.

Each rank gets torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`), so
`keras_strategies.cluster.resolve_cluster()` (and torch itself) reads them on
any backend, plus `KERAS_STRATEGIES_LAUNCHED=1`. The machine's cores are
divided among the local ranks (see `rank_thread_settings`).
"""

import os

from keras_strategies.cluster import NUM_PS_VARIABLE
from keras_strategies.cluster.rendezvous import agree_nodes
from keras_strategies.cluster.spec import split_address
from keras_strategies.devices import usable_cores
from keras_strategies.errors import ClusterError, LaunchError
from keras_strategies.launch.job import Job, say
from keras_strategies.launch.ports import port_in_use, quiet_port

RENDEZVOUS_TIMEOUT = 300.0  # seconds the machines' launchers have to meet (--rendezvous-timeout)
_XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# Other cluster descriptions would take precedence over (or contradict) the
# variables the launcher sets: refuse them rather than start a confused job.
_FOREIGN_CLUSTER_VARIABLES = (
    "TF_CONFIG",
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)


def rank_thread_settings(nproc_per_node, environ=None, cpu_count=None):
    """The thread variables each local rank gets: the cores divided among ranks.

    Several processes each using every core run many times slower than with
    their share (torchrun sets `OMP_NUM_THREADS=1` for the same reason), on
    every backend: TensorFlow, XLA (JAX) and torch each size their own pools.

    Args:
        nproc_per_node: the number of ranks on this machine.
        environ: the environment the ranks start from (`os.environ` when
            `None`); a variable already set there is kept as it is.
        cpu_count: the usable cores; this process's CPU affinity when `None`.

    Returns:
        A dict of the variables to add: `OMP_NUM_THREADS`, `MKL_NUM_THREADS`,
        `TF_NUM_INTRAOP_THREADS` (the share, at least 1),
        `TF_NUM_INTEROP_THREADS` (1 for a one-thread share, else 2), and for a
        one-thread share `XLA_FLAGS` with
        `--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`
        appended (unless `XLA_FLAGS` already sets either flag).

    Example:
    >>> rank_thread_settings(2, environ={}, cpu_count=2)["OMP_NUM_THREADS"]
    '1'
    """
    environ = os.environ if environ is None else environ
    cores = usable_cores() if cpu_count is None else cpu_count
    threads = max(1, cores // max(1, nproc_per_node))
    wanted = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": "1" if threads == 1 else "2",
    }
    settings = {k: v for k, v in wanted.items() if not environ.get(k)}
    xla = environ.get("XLA_FLAGS", "")
    if threads == 1 and not any(
        flag in xla
        for flag in ("xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads")
    ):
        settings["XLA_FLAGS"] = f"{xla} {_XLA_ONE_THREAD}".strip()
    return settings


def _resolve_master(master, nnodes, node_rank):
    """`(addr, port)` of rank 0's rendezvous, checked."""
    if master is None:
        if nnodes > 1:
            raise LaunchError(
                f"--nnodes {nnodes} needs --master ADDR:PORT: the address of "
                "node 0 and a free port there, the same on every node (e.g. "
                "--master 10.0.0.1:29500)."
            )
        return "127.0.0.1", quiet_port("127.0.0.1")  # stays free until rank 0 binds it
    try:
        addr, port = split_address(master, "--master")
    except ClusterError as error:
        raise LaunchError(str(error)) from None
    if node_rank == 0 and port_in_use(addr, port):
        raise LaunchError(
            f"--master {master}: port {port} is already in use on this machine "
            "(node 0, where rank 0 listens): pick a free port, or stop what "
            f"holds {port}."
        )
    return addr, port


def _check_options(command, nproc_per_node, nnodes, node_rank, timeout, rendezvous_timeout=RENDEZVOUS_TIMEOUT):
    if isinstance(command, str) or not command or not all(
        isinstance(part, str) for part in command
    ):
        raise LaunchError(
            "command must be a non-empty list of strings, the argv of each rank, "
            f"e.g. [sys.executable, 'train.py']; got {command!r}."
        )
    for name, value in (("nproc_per_node", nproc_per_node), ("nnodes", nnodes)):
        if not isinstance(value, int) or value < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be an integer >= 1; got {value!r}.")
    if not isinstance(node_rank, int) or not 0 <= node_rank < nnodes:
        raise LaunchError(
            f"--node-rank must be 0..{nnodes - 1} with --nnodes {nnodes}; got {node_rank!r}."
        )
    for name, value in (("timeout", timeout), ("rendezvous-timeout", rendezvous_timeout)):
        if value is not None and not value > 0:
            raise LaunchError(f"--{name} must be a positive number of seconds; got {value!r}.")


def launch(command, nproc_per_node=1, nnodes=1, node_rank=0, master=None, env=None, timeout=None,
           prefix_output=True, num_ps=0, rendezvous_timeout=RENDEZVOUS_TIMEOUT):
    """Starts this machine's ranks of a job and waits for them.

    Args:
        command: the full argv of each rank, e.g.
            `[sys.executable, "train.py", "--epochs", "3"]`.
        nproc_per_node: ranks to start on this machine.
        nnodes: machines in the job (each runs this launcher).
        node_rank: this machine's index, `0..nnodes - 1`; node 0 hosts rank 0.
        master: `"ADDR:PORT"` of the rendezvous, required when `nnodes > 1`
            (on node 0 a port in use is an error); else `None` picks a free
            port on 127.0.0.1.
        env: variables to add to (or override in) `os.environ` for the ranks
            (not TF_CONFIG or KERAS_DISTRIBUTION_*: the launcher sets those).
        timeout: seconds after which every rank is stopped and the launcher
            returns 124; `None` waits for ever.
        prefix_output: prefix each output line with `[rank K] ` (`[chief] `,
            `[worker K] `, `[ps K] ` with `num_ps`).
        num_ps: how many of the job's processes (the last ones) are
            parameter servers (sets `KERAS_STRATEGIES_NUM_PS`); rank 0 is the
            chief, the others workers, whose failure does not stop the job.
        rendezvous_timeout: with `nnodes > 1`, the seconds the machines'
            launchers wait for each other before every one fails with a
            `LaunchError` naming the machine; default 300.

    Returns:
        The exit code: 0 when every rank exits 0; else the first failed
        rank's (128 + N for signal N); 124 on timeout; after SIGINT, SIGTERM
        or SIGHUP to the launcher 75 if the ranks saved and exited 75, else
        130, 143 or 129.

    Raises:
        LaunchError: bad options, a busy `--master` port, machines that do
            not make one job, or a rank that cannot be started.

    Example:
    ```python
    import sys
    from keras_strategies.launch import launch
    code = launch([sys.executable, "train.py", "--epochs", "3"], nproc_per_node=2)
    ```
    """
    command = list(command) if isinstance(command, (list, tuple)) else command
    rendezvous_timeout = RENDEZVOUS_TIMEOUT if rendezvous_timeout is None else rendezvous_timeout
    _check_options(command, nproc_per_node, nnodes, node_rank, timeout, rendezvous_timeout)
    _check_num_ps(num_ps, None if nnodes > 1 else nproc_per_node)
    base = _base_environment(env)
    addr, port = _resolve_master(master, nnodes, node_rank)
    master = f"{addr}:{port}"
    ranks, world_size = ranks_of_this_machine(master, node_rank, nnodes, nproc_per_node, rendezvous_timeout, num_ps)
    _check_num_ps(num_ps, world_size)
    environments, labels, workers = _rank_environments(base, ranks, world_size, nproc_per_node, node_rank, master,
                                                       num_ps)
    return Job(command, environments, prefix_output, labels, expendable=workers).run(timeout)


def _rank_environments(base, ranks, world_size, nproc_per_node, node_rank, master, num_ps):
    """Each of this machine's ranks' environment and output label, and the
    ranks whose failure does not stop the job (a ParameterServer job's workers)."""
    base.update(rank_thread_settings(nproc_per_node, base))
    if num_ps:
        base[NUM_PS_VARIABLE] = str(num_ps)
    environments = [
        rank_environment(base, rank, world_size, local_rank, nproc_per_node, node_rank, master)
        for local_rank, rank in enumerate(ranks)
    ]
    labels = [role_label(rank, world_size, num_ps) for rank in ranks]
    workers = [rank for rank, label in zip(ranks, labels) if num_ps and label.startswith("worker")]
    return environments, labels, workers


def ranks_of_this_machine(master, node_rank, nnodes, nproc_per_node, rendezvous_timeout, num_ps=0):
    """This machine's global ranks and the job's world size.

    With several machines, their launchers first meet at `master`
    (`keras_strategies.cluster.rendezvous.agree_nodes`): each may run its own
    number of processes, and machine k's ranks follow those of machines
    0..k-1. Ranks are never computed as `nnodes x nproc_per_node`.

    Args:
        master: node 0's `"addr:port"`.
        node_rank, nnodes, nproc_per_node: this launcher's options.
        rendezvous_timeout: seconds the launchers have to meet.
        num_ps: this launcher's `--num-ps` (every machine must agree).

    Returns:
        `(ranks, world_size)`: this machine's ranks, in local-rank order.

    Raises:
        LaunchError: a machine never arrived, two claim one node rank, they
            disagree on `--nnodes` or `--num-ps`, or node 0 is unreachable.
    """
    if nnodes == 1:
        return list(range(nproc_per_node)), nproc_per_node
    counts = agree_nodes(master, node_rank, nnodes, nproc_per_node, rendezvous_timeout, num_ps)
    first = sum(counts[:node_rank])
    ranks = list(range(first, first + nproc_per_node))
    say(f"node {node_rank} of {nnodes}: ranks {ranks[0]}..{ranks[-1]} of {sum(counts)} "
        f"(processes per machine: {', '.join(map(str, counts))}).")
    return ranks, sum(counts)


def role_label(rank, world_size, num_ps):
    """How the launcher names a rank in its output: `"rank K"`, or with
    parameter servers `"chief"`, `"worker K"`, `"ps K"`."""
    if not num_ps:
        return f"rank {rank}"
    training = world_size - num_ps
    if rank == 0:
        return "chief"
    return f"worker {rank - 1}" if rank < training else f"ps {rank - training}"


def _check_num_ps(num_ps, world_size):
    """`world_size=None`: only the option itself (before the machines meet)."""
    if not isinstance(num_ps, int) or num_ps < 0:
        raise LaunchError(f"--num-ps must be an integer >= 0; got {num_ps!r}.")
    if num_ps and world_size is not None and world_size < num_ps + 2:
        raise LaunchError(
            f"--num-ps {num_ps} with {world_size} process(es) leaves no worker: a parameter-server "
            f"job needs a chief, at least one worker and the parameter servers (at least "
            f"{num_ps + 2} processes in all)."
        )


def _base_environment(env):
    """`os.environ` with `env` on top, checked for other cluster descriptions."""
    base = dict(os.environ)
    base.update({str(k): str(v) for k, v in (env or {}).items()})
    foreign = [name for name in _FOREIGN_CLUSTER_VARIABLES if base.get(name)]
    if foreign:
        raise LaunchError(
            f"{', '.join(foreign)} is set: it would override the ranks' RANK/"
            "WORLD_SIZE set by the launcher. Unset it, or start the job "
            "without the launcher."
        )
    base.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the prefixer live
    return base


def rank_environment(base, rank, world_size, local_rank, local_world_size, node_rank, master):
    """One rank's environment: `base` plus torchrun's variables.

    Args:
        base: the variables every rank shares.
        rank, world_size: this rank and the number of ranks in the job.
        local_rank, local_world_size: this rank's index on its machine, and
            the number of ranks there.
        node_rank: this machine's index.
        master: `"ADDR:PORT"` of rank 0's rendezvous.

    Returns:
        A new dict.
    """
    addr, port = master.rsplit(":", 1)
    environment = dict(base)
    environment.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_world_size),
        GROUP_RANK=str(node_rank),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        KERAS_STRATEGIES_LAUNCHED="1",
    )
    return environment
