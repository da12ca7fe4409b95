"""Who this process is in a multi-process job, read from the environment.

One backend-neutral `ClusterSpec` comes from whichever description the job
was started with:

| source | variables read |
| --- | --- |
| `"TF_CONFIG"` | `TF_CONFIG` (JSON `{"cluster": {...}, "task": {"type", "index"}}`) |
| `"torchrun"` | `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK` (or `NODE_RANK`), `MASTER_ADDR`, `MASTER_PORT` |
| `"KERAS_DISTRIBUTION"` | `KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES`, `KERAS_DISTRIBUTION_PROCESS_ID` |
| `"SLURM"` | `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NODELIST` (or `SLURM_JOB_NODELIST`), `SLURM_NTASKS_PER_NODE` / `SLURM_TASKS_PER_NODE`, `SLURM_NODEID`, `SLURM_NNODES`, `SLURM_JOB_ID`, `MASTER_ADDR`, `MASTER_PORT` |

When several are set, the first in this order wins: TF_CONFIG, torchrun,
KERAS_DISTRIBUTION, SLURM; the others must agree with it on rank and world
size. Nothing set means one process (`source="none"`).

This module imports no backend: the launcher and every backend share it.
"""

import dataclasses
import json
import os
import re

from keras_strategies.errors import StrategyError

SOURCES = ("TF_CONFIG", "torchrun", "KERAS_DISTRIBUTION", "SLURM")
TASK_TYPES = ("chief", "worker", "ps", "evaluator")
_TRAINING_TYPES = ("chief", "worker")
_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)
# Variables set by a launcher that starts several ranks per SLURM task
# (torchrun, `keras-strategies launch`): SLURM then describes the launcher.
_LAUNCHER_MARKERS = ("KERAS_STRATEGIES_LAUNCHED", "TORCHELASTIC_RUN_ID")


class ClusterError(StrategyError):
    """The environment's cluster description is incomplete or contradicts itself.

    The message names the variable and says what to change.
    """


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

    @property
    def is_chief(self):
        """`True` for rank 0, the process that logs and writes files."""
        return self.rank == 0

    @property
    def is_multi_process(self):
        """`True` when the job has more than one training process."""
        return self.world_size > 1


def resolve_cluster(environ=None):
    """Reads this process's place in the job from the environment.

    Args:
        environ: a mapping of environment variables; `os.environ` when `None`.

    Returns:
        A `ClusterSpec`. With no description set: rank 0 of 1,
        `source="none"`.

    Raises:
        ClusterError: a description is incomplete or contradicts itself, or
            two descriptions disagree on rank or world size. The message
            names the variable(s) and says what to change.

    Example:
    >>> spec = resolve_cluster({
    ...     "RANK": "1", "WORLD_SIZE": "2",
    ...     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    >>> spec.rank, spec.world_size, spec.coordinator, spec.is_chief
    (1, 2, '127.0.0.1:29500', False)
    """
    env = os.environ if environ is None else environ
    found = []
    for variables, parse in _PARSERS:
        if parse is _from_slurm and found and _launched(env):
            # A launcher started under srun: SLURM describes the launcher
            # (one task per node), the launcher's variables describe us.
            continue
        spec = parse(env)
        if spec is not None:
            found.append((variables, spec))
    if not found:
        return ClusterSpec()
    (chosen_vars, chosen), others = found[0], found[1:]
    for other_vars, other in others:
        if (other.rank, other.world_size) != (chosen.rank, chosen.world_size):
            raise ClusterError(
                f"Two cluster descriptions disagree: {chosen_vars} say rank "
                f"{chosen.rank} of {chosen.world_size}, {other_vars} say rank "
                f"{other.rank} of {other.world_size}. Unset one of them or make "
                f"them agree ({chosen.source} takes precedence when they agree)."
            )
    return chosen


# --------------------------------------------------------------------------
# Small readers shared by the sources.


def _get(env, name):
    """The variable's value stripped, or `None` when unset or empty."""
    value = env.get(name)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _int(env, name, what, minimum=0):
    raw = _get(env, name)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ClusterError(
            f"{name}={raw!r} is not an integer: set {name} to {what}."
        ) from None
    if value < minimum:
        bound = "negative" if minimum == 0 else f"below {minimum}"
        raise ClusterError(f"{name}={value} is {bound}: set {name} to {what}.")
    return value


def _port(raw, name):
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


def _split_address(text, name):
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


def _join_address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host):
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _locality(hosts, index):
    """`(local_rank, local_world_size, node_rank)` of `hosts[index]`.

    `hosts` lists the machine of every training process in rank order.
    """
    host = hosts[index]
    machines = list(dict.fromkeys(hosts))
    return (
        hosts[:index].count(host),
        hosts.count(host),
        machines.index(host),
    )


def _launched(env):
    return any(_get(env, name) for name in _LAUNCHER_MARKERS)


# --------------------------------------------------------------------------
# TF_CONFIG.


def _from_tf_config(env):
    raw = _get(env, "TF_CONFIG")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except ValueError as error:
        raise ClusterError(
            f"TF_CONFIG is not valid JSON ({error}): set it to e.g. "
            f"{_TF_CONFIG_EXAMPLE}."
        ) from None
    if not isinstance(config, dict):
        raise ClusterError(
            f"TF_CONFIG must be a JSON object; got {raw!r}. Set it to e.g. "
            f"{_TF_CONFIG_EXAMPLE}."
        )
    if not config:
        return None  # '{}': TensorFlow treats it as no cluster too.
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise ClusterError(
            'TF_CONFIG has no "cluster" (a dict from task type to a list of '
            f'"host:port" addresses): set it to e.g. {_TF_CONFIG_EXAMPLE}.'
        )
    for task_type, addresses in cluster.items():
        if task_type not in TASK_TYPES:
            raise ClusterError(
                f'TF_CONFIG: unknown task type {task_type!r} in "cluster": use '
                f"{', '.join(map(repr, TASK_TYPES))}."
            )
        if not isinstance(addresses, list) or not all(
            isinstance(a, str) for a in addresses
        ):
            raise ClusterError(
                f'TF_CONFIG: "cluster"["{task_type}"] must be a list of '
                f'"host:port" strings; got {addresses!r}.'
            )
        for address in addresses:
            _split_address(address, f'TF_CONFIG "cluster"["{task_type}"]')
    if len(cluster.get("chief", [])) > 1:
        raise ClusterError(
            'TF_CONFIG: "cluster"["chief"] lists '
            f"{len(cluster['chief'])} addresses; there is one chief: move the "
            'others to "worker".'
        )
    training = [a for t in _TRAINING_TYPES for a in cluster.get(t, [])]
    if not training:
        raise ClusterError(
            'TF_CONFIG: "cluster" has no "chief" or "worker" task: list the '
            "training processes under \"worker\" (and optionally one \"chief\")."
        )

    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise ClusterError(
            'TF_CONFIG has no "task" (this process\'s {"type": ..., "index": '
            '...}): add e.g. "task": {"type": "worker", "index": 0}.'
        )
    task_type = task["type"]
    if task_type not in TASK_TYPES:
        raise ClusterError(
            f'TF_CONFIG: unknown "task" type {task_type!r}: use '
            f"{', '.join(map(repr, TASK_TYPES))}."
        )
    members = cluster.get(task_type)
    if members is None and task_type != "evaluator":
        raise ClusterError(
            f'TF_CONFIG: "task" type {task_type!r} has no entry in "cluster": '
            f'add "{task_type}": ["host:port", ...] to "cluster".'
        )
    if "index" not in task and members is not None and len(members) > 1:
        raise ClusterError(
            f'TF_CONFIG: "task" has no "index" and "cluster"["{task_type}"] has '
            f'{len(members)} tasks: add "index": 0..{len(members) - 1}.'
        )
    index = task.get("index", 0)
    if isinstance(index, str) and index.strip().isdigit():
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ClusterError(
            f'TF_CONFIG: "task" "index" must be a non-negative integer; got '
            f"{index!r}."
        )
    if members is not None and index >= len(members):
        raise ClusterError(
            f'TF_CONFIG: "task" index {index} is out of range: '
            f'"cluster"["{task_type}"] has {len(members)} task(s), so the index '
            f"must be 0..{len(members) - 1}."
        )

    hosts = [_split_address(a, "TF_CONFIG")[0] for a in training]
    n_chief = len(cluster.get("chief", []))
    if task_type in _TRAINING_TYPES:
        rank = index if task_type == "chief" else n_chief + index
        local_rank, local_world_size, node_rank = _locality(hosts, rank)
    else:
        # A ps/evaluator task is not a training process: rank -1 (documented).
        rank = local_rank = node_rank = -1
        own = members[index] if members else None
        local_world_size = hosts.count(_split_address(own, "TF_CONFIG")[0]) if own else 0
    return ClusterSpec(
        rank=rank,
        world_size=len(training),
        local_rank=local_rank,
        local_world_size=local_world_size,
        node_rank=node_rank,
        coordinator=training[0],
        source="TF_CONFIG",
        task_type=task_type,
        task_index=index,
        tf_cluster={k: list(v) for k, v in cluster.items()},
    )


# --------------------------------------------------------------------------
# torchrun (and any launcher with its variables, e.g. `keras-strategies launch`).


def _from_torchrun(env):
    has_rank = _get(env, "RANK") is not None
    has_world = _get(env, "WORLD_SIZE") is not None
    if not has_rank and not has_world:
        return None
    if not has_world:
        raise ClusterError(
            "RANK is set but WORLD_SIZE is not: set WORLD_SIZE to the number "
            "of processes (torchrun sets both), or unset RANK."
        )
    if not has_rank:
        raise ClusterError(
            "WORLD_SIZE is set but RANK is not: set RANK to this process's "
            "index 0..WORLD_SIZE-1 (torchrun sets both), or unset WORLD_SIZE."
        )
    world = _int(env, "WORLD_SIZE", "the number of processes (at least 1)", 1)
    rank = _int(env, "RANK", f"this process's index, 0..{world - 1}")
    if rank >= world:
        raise ClusterError(
            f"RANK={rank} is not below WORLD_SIZE={world}: ranks run "
            f"0..{world - 1}; fix RANK or WORLD_SIZE."
        )
    local_world = world
    if _get(env, "LOCAL_WORLD_SIZE") is not None:
        local_world = _int(
            env, "LOCAL_WORLD_SIZE", "the number of processes on this machine", 1
        )
        if local_world > world:
            raise ClusterError(
                f"LOCAL_WORLD_SIZE={local_world} is above WORLD_SIZE={world}: "
                "a machine cannot hold more processes than the job."
            )
    local_rank = rank % local_world
    if _get(env, "LOCAL_RANK") is not None:
        local_rank = _int(
            env, "LOCAL_RANK", f"this process's index on its machine, 0..{local_world - 1}"
        )
        if local_rank >= local_world:
            raise ClusterError(
                f"LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE="
                f"{local_world}: fix LOCAL_RANK or LOCAL_WORLD_SIZE."
            )
    node_rank = rank // local_world
    for name in ("GROUP_RANK", "NODE_RANK"):
        if _get(env, name) is not None:
            node_rank = _int(env, name, "this machine's index (0 for the first)")
            break

    addr, port = _get(env, "MASTER_ADDR"), _get(env, "MASTER_PORT")
    if port is not None:
        port = _port(port, "MASTER_PORT")
    if world > 1:
        for name, value, example in (
            ("MASTER_ADDR", addr, "127.0.0.1 on one machine"),
            ("MASTER_PORT", port, "a free port such as 29500"),
        ):
            if value is None:
                raise ClusterError(
                    f"{name} is not set: with WORLD_SIZE={world} every process "
                    f"needs rank 0's rendezvous address; set {name} ({example}), "
                    "or start the job with `keras-strategies launch` or torchrun."
                )
    coordinator = _join_address(addr, port) if addr and port else None
    return ClusterSpec(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        coordinator=coordinator,
        source="torchrun",
        task_type="worker",
        task_index=rank,
    )


# --------------------------------------------------------------------------
# Keras's own KERAS_DISTRIBUTION_* (see `keras.distribution.initialize`).

_K_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
_K_NUM = "KERAS_DISTRIBUTION_NUM_PROCESSES"
_K_ID = "KERAS_DISTRIBUTION_PROCESS_ID"


def _from_keras(env):
    if all(_get(env, name) is None for name in (_K_ADDRESSES, _K_NUM, _K_ID)):
        return None
    for name, what in ((_K_NUM, "the number of processes"), (_K_ID, "this process's index")):
        if _get(env, name) is None:
            raise ClusterError(
                f"{name} is not set but other KERAS_DISTRIBUTION_* variables "
                f"are: set {name} to {what}."
            )
    world = _int(env, _K_NUM, "the number of processes (at least 1)", 1)
    rank = _int(env, _K_ID, f"this process's index, 0..{world - 1}")
    if rank >= world:
        raise ClusterError(
            f"{_K_ID}={rank} is not below {_K_NUM}={world}: process ids run "
            f"0..{world - 1}."
        )
    raw = _get(env, _K_ADDRESSES)
    if raw is None:
        if world > 1:
            raise ClusterError(
                f"{_K_ADDRESSES} is not set: with {_K_NUM}={world} set it to the "
                "comma-separated host:port of every process (process 0 first), "
                "or to process 0's address alone."
            )
        return ClusterSpec(source="KERAS_DISTRIBUTION")
    addresses = [a.strip() for a in raw.split(",")]
    if any(not a for a in addresses):
        raise ClusterError(
            f"{_K_ADDRESSES}={raw!r} has an empty entry: write host:port "
            "addresses separated by single commas."
        )
    hosts = [_split_address(a, _K_ADDRESSES)[0] for a in addresses]
    if len(addresses) not in (1, world):
        raise ClusterError(
            f"{_K_ADDRESSES} lists {len(addresses)} addresses but {_K_NUM}="
            f"{world}: list one address per process (or only process 0's, the "
            f"coordinator), or fix {_K_NUM}."
        )
    if len(addresses) == world:
        local_rank, local_world, node_rank = _locality(hosts, rank)
    elif _is_loopback(hosts[0]):
        # Only the coordinator is given, on loopback: every process is here.
        local_rank, local_world, node_rank = rank, world, 0
    else:
        # Only the coordinator is given: one process per machine (JAX's habit).
        local_rank, local_world, node_rank = 0, 1, rank
    return ClusterSpec(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        coordinator=addresses[0],
        source="KERAS_DISTRIBUTION",
        task_type="worker",
        task_index=rank,
    )


# --------------------------------------------------------------------------
# SLURM (tasks started by srun).


def _expand_hostlist(text, name="SLURM_NODELIST"):
    """Expands a SLURM host list such as `"node[01-03,07],gpu1"` to host names."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            break
        current += char
    parts.append(current)
    if depth != 0:
        raise ClusterError(
            f"{name}={text!r} has unbalanced brackets: use SLURM's host list "
            "syntax, e.g. node[01-04,07],other."
        )
    hosts = []
    for part in parts:
        hosts.extend(_expand_one_host(part.strip(), text, name))
    if not hosts or any(not h for h in hosts):
        raise ClusterError(f"{name}={text!r} has an empty host name.")
    return hosts


def _expand_one_host(part, text, name):
    match = re.search(r"\[([^\[\]]*)\]", part)
    if not match:
        return [part]
    prefix, suffix = part[: match.start()], part[match.end():]
    values = []
    for item in match.group(1).split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ClusterError(
                f"{name}={text!r}: {item!r} is not a number or a range such as "
                "01-04."
            )
        if not dash:
            values.append(low)
        else:
            values.extend(
                f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1)
            )
    tails = _expand_one_host(suffix, text, name)
    return [prefix + value + tail for value in values for tail in tails]


def _tasks_per_node(text):
    """`"2(x3),1"` (SLURM_TASKS_PER_NODE) -> `[2, 2, 2, 1]`; `None` if unreadable."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            return None
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _from_slurm(env):
    if _get(env, "SLURM_NTASKS") is None:
        return None
    tasks = _int(env, "SLURM_NTASKS", "the number of tasks (srun -n)", 1)
    if tasks == 1:
        return None  # One task (an interactive allocation...): not multi-process.
    for name in ("SLURM_PROCID", "SLURM_LOCALID"):
        if _get(env, name) is None:
            raise ClusterError(
                f"SLURM_NTASKS={tasks} but {name} is not set: start every task "
                "with srun (which sets it), or unset SLURM_NTASKS for a single "
                "process."
            )
    rank = _int(env, "SLURM_PROCID", f"this task's index, 0..{tasks - 1}")
    if rank >= tasks:
        raise ClusterError(
            f"SLURM_PROCID={rank} is not below SLURM_NTASKS={tasks}: fix "
            "SLURM_PROCID or SLURM_NTASKS."
        )
    local_rank = _int(env, "SLURM_LOCALID", "this task's index on its node")

    nodelist_name = next(
        (n for n in ("SLURM_NODELIST", "SLURM_JOB_NODELIST") if _get(env, n)),
        "SLURM_NODELIST",
    )
    hosts = None
    if _get(env, nodelist_name) is not None:
        hosts = _expand_hostlist(_get(env, nodelist_name), nodelist_name)

    node_rank = None
    if _get(env, "SLURM_NODEID") is not None:
        node_rank = _int(env, "SLURM_NODEID", "this node's index")
    local_world = None
    if _get(env, "SLURM_NTASKS_PER_NODE") is not None:
        local_world = _int(
            env, "SLURM_NTASKS_PER_NODE", "the number of tasks per node", 1
        )
    elif _get(env, "SLURM_TASKS_PER_NODE") is not None and node_rank is not None:
        counts = _tasks_per_node(_get(env, "SLURM_TASKS_PER_NODE"))
        if counts and node_rank < len(counts):
            local_world = counts[node_rank]
    if local_world is None:
        nodes = None
        if _get(env, "SLURM_NNODES") is not None:
            nodes = _int(env, "SLURM_NNODES", "the number of nodes", 1)
        elif hosts is not None:
            nodes = len(hosts)
        local_world = -(-tasks // nodes) if nodes else tasks
    if local_rank >= local_world:
        raise ClusterError(
            f"SLURM_LOCALID={local_rank} is not below the {local_world} task(s) "
            "per node (SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE): fix them."
        )
    if node_rank is None:
        node_rank = rank // local_world

    addr = _get(env, "MASTER_ADDR") or (hosts[0] if hosts else None)
    if addr is None:
        raise ClusterError(
            f"SLURM_NTASKS={tasks} but SLURM_NODELIST is not set: rank 0's "
            "host comes from it (srun sets it), or set MASTER_ADDR."
        )
    if _get(env, "MASTER_PORT") is not None:
        port = _port(_get(env, "MASTER_PORT"), "MASTER_PORT")
    elif _get(env, "SLURM_JOB_ID") is not None:
        # Deterministic per job, as PyTorch Lightning does.
        port = 15000 + _int(env, "SLURM_JOB_ID", "the job's id") % 20000
    else:
        raise ClusterError(
            f"SLURM_NTASKS={tasks} but neither MASTER_PORT nor SLURM_JOB_ID is "
            "set: set MASTER_PORT to a free port on the first node."
        )
    return ClusterSpec(
        rank=rank,
        world_size=tasks,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        coordinator=_join_address(addr, port),
        source="SLURM",
        task_type="worker",
        task_index=rank,
    )


# (variables named in disagreement errors, parser), in precedence order.
_PARSERS = (
    ("TF_CONFIG", _from_tf_config),
    ("RANK/WORLD_SIZE", _from_torchrun),
    (f"{_K_ID}/{_K_NUM}", _from_keras),
    ("SLURM_PROCID/SLURM_NTASKS", _from_slurm),
)
