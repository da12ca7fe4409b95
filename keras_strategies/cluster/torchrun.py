"""The cluster from torchrun's variables (and any launcher that sets them,
`keras-strategies launch` among them)."""

from keras_strategies.cluster.spec import ClusterError, ClusterSpec, get, join_address, read_int, read_port

VARIABLES = "RANK/WORLD_SIZE"


def _rank_and_world(env):
    has_rank, has_world = get(env, "RANK") is not None, get(env, "WORLD_SIZE") is not None
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
    world = read_int(env, "WORLD_SIZE", "the number of processes (at least 1)", 1)
    rank = read_int(env, "RANK", f"this process's index, 0..{world - 1}")
    if rank >= world:
        raise ClusterError(
            f"RANK={rank} is not below WORLD_SIZE={world}: ranks run 0..{world - 1}; fix RANK or WORLD_SIZE."
        )
    return rank, world


def _locality(env, rank, world):
    """`(local_rank, local_world_size, node_rank)`."""
    local_world = world
    if get(env, "LOCAL_WORLD_SIZE") is not None:
        local_world = read_int(env, "LOCAL_WORLD_SIZE", "the number of processes on this machine", 1)
        if local_world > world:
            raise ClusterError(
                f"LOCAL_WORLD_SIZE={local_world} is above WORLD_SIZE={world}: "
                "a machine cannot hold more processes than the job."
            )
    local_rank = rank % local_world
    if get(env, "LOCAL_RANK") is not None:
        local_rank = read_int(env, "LOCAL_RANK", f"this process's index on its machine, 0..{local_world - 1}")
        if local_rank >= local_world:
            raise ClusterError(
                f"LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world}: "
                "fix LOCAL_RANK or LOCAL_WORLD_SIZE."
            )
    node_rank = rank // local_world
    for name in ("GROUP_RANK", "NODE_RANK"):
        if get(env, name) is not None:
            node_rank = read_int(env, name, "this machine's index (0 for the first)")
            break
    return local_rank, local_world, node_rank


def _coordinator(env, world):
    addr, port = get(env, "MASTER_ADDR"), get(env, "MASTER_PORT")
    if port is not None:
        port = read_port(port, "MASTER_PORT")
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
    return join_address(addr, port) if addr and port else None


def read(env):
    """The `ClusterSpec` torchrun's variables describe, or `None` when unset."""
    if get(env, "RANK") is None and get(env, "WORLD_SIZE") is None:
        return None
    rank, world = _rank_and_world(env)
    return ClusterSpec.worker(rank, world, _locality(env, rank, world), _coordinator(env, world), "torchrun")
