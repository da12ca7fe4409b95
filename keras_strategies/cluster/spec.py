"""`ClusterSpec`, `ClusterError` and the small readers every source shares."""

import dataclasses

from keras_strategies.errors import ClusterError

TASK_TYPES = ("chief", "worker", "ps", "evaluator")
TRAINING_TYPES = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Who this process is in the job.

    Attributes:
        rank: global index of this training process, `0..world_size - 1`;
            rank 0 is the chief. `-1` for a TF_CONFIG `"ps"` or
            `"evaluator"` task, which is not one of the training processes.
        world_size: number of training processes (TF_CONFIG: chief + workers).
        local_rank: index among the training processes of this machine
            (`-1` for a ps/evaluator task).
        local_world_size: number of training processes on this machine.
        node_rank: index of this machine (`-1` for a ps/evaluator task).
        coordinator: `"host:port"` of rank 0's rendezvous/coordinator, or
            `None` when `world_size == 1` and nothing says it.
        source: `"TF_CONFIG"`, `"torchrun"`, `"KERAS_DISTRIBUTION"`,
            `"SLURM"` or `"none"`.
        task_type: `"chief"`, `"worker"`, `"ps"` or `"evaluator"`; every
            source but TF_CONFIG says `"worker"` (rank 0 is still the chief).
        task_index: index within `task_type` (the rank outside TF_CONFIG).
        tf_cluster: TF_CONFIG's `"cluster"` dict when the source is
            TF_CONFIG, else `None`.
        num_ps: the number of parameter-server processes (TF_CONFIG's
            `"ps"` tasks, or `KERAS_STRATEGIES_NUM_PS` with another source).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    coordinator: str | None = None
    source: str = "none"
    task_type: str = "worker"
    task_index: int = 0
    tf_cluster: dict | None = dataclasses.field(default=None, hash=False)
    num_ps: int = 0

    @classmethod
    def worker(cls, rank, world_size, locality, coordinator, source):
        """The spec of training process `rank` from a source that knows no
        task types (every source but TF_CONFIG).

        Args:
            rank: this process's rank.
            world_size: the number of processes.
            locality: `(local_rank, local_world_size, node_rank)`.
            coordinator: rank 0's `"host:port"`, or `None`.
            source: the source's name.

        Returns:
            A `ClusterSpec` with `task_type="worker"` and `task_index=rank`.
        """
        local_rank, local_world_size, node_rank = locality
        return cls(rank=rank, world_size=world_size, local_rank=local_rank,
                   local_world_size=local_world_size, node_rank=node_rank,
                   coordinator=coordinator, source=source, task_type="worker", task_index=rank)

    def with_parameter_servers(self, num_ps, variable):
        """This spec in a job whose last `num_ps` processes are parameter
        servers: rank 0 becomes the `"chief"`, ranks 1.. the `"worker"`s
        (task index rank - 1), the last `num_ps` the `"ps"` tasks (rank -1,
        as for TF_CONFIG).

        Args:
            num_ps: the number of parameter servers.
            variable: the variable it was read from, named in errors.

        Returns:
            A new `ClusterSpec`.
        """
        total = self.world_size
        if total < num_ps + 2:
            raise ClusterError(
                f"{variable}={num_ps} leaves no worker: this job has {total} process(es), and a "
                f"parameter-server job needs a chief, at least one worker and {num_ps} parameter "
                f"server(s): start at least {num_ps + 2} processes, or lower {variable}."
            )
        world = total - num_ps
        if self.rank >= world:
            task_type, index, rank, local_rank, node_rank = "ps", self.rank - world, -1, -1, -1
        else:
            task_type = "chief" if self.rank == 0 else "worker"
            index, rank = max(0, self.rank - 1), self.rank
            local_rank, node_rank = self.local_rank, self.node_rank
        return dataclasses.replace(
            self, rank=rank, world_size=world, local_rank=local_rank, node_rank=node_rank,
            task_type=task_type, task_index=index, num_ps=num_ps)

    @property
    def process_index(self):
        """This process's index among every process of the job, parameter
        servers included (after the training processes): what an engine that
        numbers every process (torch.distributed.rpc) calls its rank."""
        return self.world_size + self.task_index if self.task_type == "ps" else self.rank

    @property
    def is_chief(self):
        """`True` for rank 0, the process that logs and writes files."""
        return self.rank == 0

    @property
    def is_multi_process(self):
        """`True` when the job has more than one training process."""
        return self.world_size > 1


def get(env, name):
    """The variable's value stripped, or `None` when unset or empty."""
    value = env.get(name)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def read_int(env, name, what, minimum=0):
    """The integer in variable `name`; `what` says what it should hold."""
    raw = get(env, name)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ClusterError(f"{name}={raw!r} is not an integer: set {name} to {what}.") from None
    if value < minimum:
        bound = "negative" if minimum == 0 else f"below {minimum}"
        raise ClusterError(f"{name}={value} is {bound}: set {name} to {what}.")
    return value


def read_port(raw, name):
    """A TCP port number from text, checked."""
    try:
        port = int(str(raw).strip())
    except ValueError:
        port = None
    if port is None or not 1 <= port <= 65535:
        raise ClusterError(
            f"{name}={raw!r} is not a port number: set {name} to an integer "
            "from 1 to 65535, e.g. 29500."
        )
    return port


def split_address(text, name):
    """Splits `"host:port"` (or `"[v6]:port"`) into `(host, port)`."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise ClusterError(
            f"{name}: {text!r} is not a 'host:port' address: write each "
            "address as host:port, e.g. 10.0.0.1:12345."
        )
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ClusterError(
            f"{name}: {text!r} has no valid port ({port!r}): write host:port "
            "with a port from 1 to 65535, e.g. 10.0.0.1:12345."
        )
    return host, int(port)


def join_address(host, port):
    """`host:port`, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host):
    """Whether `host` names this machine's loopback interface."""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def locality(hosts, index):
    """`(local_rank, local_world_size, node_rank)` of `hosts[index]`.

    `hosts` lists the machine of every training process in rank order.
    """
    host = hosts[index]
    machines = list(dict.fromkeys(hosts))
    return hosts[:index].count(host), hosts.count(host), machines.index(host)
