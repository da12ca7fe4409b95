"""The cluster from Keras's own `KERAS_DISTRIBUTION_*` variables (see
`keras.distribution.initialize`)."""

from keras_strategies.cluster.spec import (
    ClusterError,
    ClusterSpec,
    get,
    is_loopback,
    locality,
    read_int,
    split_address,
)

ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ID = "KERAS_DISTRIBUTION_PROCESS_ID"
VARIABLES = f"{ID}/{NUM}"


def _rank_and_world(env):
    for name, what in ((NUM, "the number of processes"), (ID, "this process's index")):
        if get(env, name) is None:
            raise ClusterError(
                f"{name} is not set but other KERAS_DISTRIBUTION_* variables are: set {name} to {what}."
            )
    world = read_int(env, NUM, "the number of processes (at least 1)", 1)
    rank = read_int(env, ID, f"this process's index, 0..{world - 1}")
    if rank >= world:
        raise ClusterError(f"{ID}={rank} is not below {NUM}={world}: process ids run 0..{world - 1}.")
    return rank, world


def _addresses(raw, world):
    addresses = [a.strip() for a in raw.split(",")]
    if any(not a for a in addresses):
        raise ClusterError(
            f"{ADDRESSES}={raw!r} has an empty entry: write host:port addresses separated by single commas."
        )
    hosts = [split_address(a, ADDRESSES)[0] for a in addresses]
    if len(addresses) not in (1, world):
        raise ClusterError(
            f"{ADDRESSES} lists {len(addresses)} addresses but {NUM}={world}: list one address per "
            f"process (or only process 0's, the coordinator), or fix {NUM}."
        )
    return addresses, hosts


def read(env):
    """The `ClusterSpec` these variables describe, or `None` when none is set."""
    if all(get(env, name) is None for name in (ADDRESSES, NUM, ID)):
        return None
    rank, world = _rank_and_world(env)
    raw = get(env, ADDRESSES)
    if raw is None:
        if world > 1:
            raise ClusterError(
                f"{ADDRESSES} is not set: with {NUM}={world} set it to the comma-separated host:port "
                "of every process (process 0 first), or to process 0's address alone."
            )
        return ClusterSpec(source="KERAS_DISTRIBUTION")
    addresses, hosts = _addresses(raw, world)
    if len(addresses) == world:
        where = locality(hosts, rank)
    elif is_loopback(hosts[0]):
        where = (rank, world, 0)  # only the coordinator is given, on loopback: every process is here
    else:
        where = (0, 1, rank)  # only the coordinator is given: one process per machine (JAX's habit)
    return ClusterSpec.worker(rank, world, where, addresses[0], "KERAS_DISTRIBUTION")
