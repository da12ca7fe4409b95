"""The cluster from SLURM's variables (tasks started by `srun`)."""

import re

from keras_strategies.cluster.spec import ClusterError, ClusterSpec, get, join_address, read_int, read_port

VARIABLES = "SLURM_PROCID/SLURM_NTASKS"


def expand_hostlist(text, name="SLURM_NODELIST"):
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
            f"{name}={text!r} has unbalanced brackets: use SLURM's host list syntax, e.g. node[01-04,07],other."
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
            raise ClusterError(f"{name}={text!r}: {item!r} is not a number or a range such as 01-04.")
        if not dash:
            values.append(low)
        else:
            values.extend(f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1))
    tails = _expand_one_host(suffix, text, name)
    return [prefix + value + tail for value in values for tail in tails]


def tasks_per_node(text):
    """`"2(x3),1"` (SLURM_TASKS_PER_NODE) -> `[2, 2, 2, 1]`; `None` if unreadable."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            return None
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _rank(env, tasks):
    for name in ("SLURM_PROCID", "SLURM_LOCALID"):
        if get(env, name) is None:
            raise ClusterError(
                f"SLURM_NTASKS={tasks} but {name} is not set: start every task "
                "with srun (which sets it), or unset SLURM_NTASKS for a single process."
            )
    rank = read_int(env, "SLURM_PROCID", f"this task's index, 0..{tasks - 1}")
    if rank >= tasks:
        raise ClusterError(
            f"SLURM_PROCID={rank} is not below SLURM_NTASKS={tasks}: fix SLURM_PROCID or SLURM_NTASKS."
        )
    return rank


def _hosts(env):
    """The expanded node list, or `None` when SLURM does not give one."""
    name = next((n for n in ("SLURM_NODELIST", "SLURM_JOB_NODELIST") if get(env, n)), None)
    return expand_hostlist(get(env, name), name) if name else None


def _local_world(env, tasks, node_rank, hosts):
    if get(env, "SLURM_NTASKS_PER_NODE") is not None:
        return read_int(env, "SLURM_NTASKS_PER_NODE", "the number of tasks per node", 1)
    if get(env, "SLURM_TASKS_PER_NODE") is not None and node_rank is not None:
        counts = tasks_per_node(get(env, "SLURM_TASKS_PER_NODE"))
        if counts and node_rank < len(counts):
            return counts[node_rank]
    nodes = None
    if get(env, "SLURM_NNODES") is not None:
        nodes = read_int(env, "SLURM_NNODES", "the number of nodes", 1)
    elif hosts is not None:
        nodes = len(hosts)
    return -(-tasks // nodes) if nodes else tasks


def _coordinator(env, tasks, hosts):
    addr = get(env, "MASTER_ADDR") or (hosts[0] if hosts else None)
    if addr is None:
        raise ClusterError(
            f"SLURM_NTASKS={tasks} but SLURM_NODELIST is not set: rank 0's "
            "host comes from it (srun sets it), or set MASTER_ADDR."
        )
    if get(env, "MASTER_PORT") is not None:
        port = read_port(get(env, "MASTER_PORT"), "MASTER_PORT")
    elif get(env, "SLURM_JOB_ID") is not None:
        # Deterministic per job, as PyTorch Lightning does.
        port = 15000 + read_int(env, "SLURM_JOB_ID", "the job's id") % 20000
    else:
        raise ClusterError(
            f"SLURM_NTASKS={tasks} but neither MASTER_PORT nor SLURM_JOB_ID is "
            "set: set MASTER_PORT to a free port on the first node."
        )
    return join_address(addr, port)


def read(env):
    """The `ClusterSpec` SLURM describes, or `None` with fewer than two tasks."""
    if get(env, "SLURM_NTASKS") is None:
        return None
    tasks = read_int(env, "SLURM_NTASKS", "the number of tasks (srun -n)", 1)
    if tasks == 1:
        return None  # One task (an interactive allocation...): not multi-process.
    rank = _rank(env, tasks)
    local_rank = read_int(env, "SLURM_LOCALID", "this task's index on its node")
    hosts = _hosts(env)
    node_rank = None
    if get(env, "SLURM_NODEID") is not None:
        node_rank = read_int(env, "SLURM_NODEID", "this node's index")
    local_world = _local_world(env, tasks, node_rank, hosts)
    if local_rank >= local_world:
        raise ClusterError(
            f"SLURM_LOCALID={local_rank} is not below the {local_world} task(s) "
            "per node (SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE): fix them."
        )
    node_rank = rank // local_world if node_rank is None else node_rank
    return ClusterSpec.worker(rank, tasks, (local_rank, local_world, node_rank),
                              _coordinator(env, tasks, hosts), "SLURM")
