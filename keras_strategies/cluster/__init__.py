"""Who this process is in a multi-process job, read from the environment.

One backend-neutral `ClusterSpec` comes from whichever description the job
was started with, one module per source:

| source | module | variables read |
| --- | --- | --- |
| `"TF_CONFIG"` | `tf_config` | `TF_CONFIG` (JSON `{"cluster": {...}, "task": {"type", "index"}}`) |
| `"torchrun"` | `torchrun` | `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK` (or `NODE_RANK`), `MASTER_ADDR`, `MASTER_PORT` |
| `"KERAS_DISTRIBUTION"` | `keras_distribution` | `KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES`, `KERAS_DISTRIBUTION_PROCESS_ID` |
| `"SLURM"` | `slurm` | `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NODELIST` (or `SLURM_JOB_NODELIST`), `SLURM_NTASKS_PER_NODE` / `SLURM_TASKS_PER_NODE`, `SLURM_NODEID`, `SLURM_NNODES`, `SLURM_JOB_ID`, `MASTER_ADDR`, `MASTER_PORT` |

When several are set, the first in this order wins: TF_CONFIG, torchrun,
KERAS_DISTRIBUTION, SLURM; the others must agree with it on rank and world
size. Nothing set means one process (`source="none"`).

Parameter servers: TF_CONFIG's `"ps"` tasks; with any other source,
`KERAS_STRATEGIES_NUM_PS=N` makes the last N processes parameter servers,
rank 0 the chief and the others workers (`keras-strategies launch --num-ps N`
sets it).

This package imports no backend: the launcher and every backend share it.
"""

import os

from keras_strategies.cluster import keras_distribution, slurm, tf_config, torchrun
from keras_strategies.cluster.spec import TASK_TYPES, ClusterError, ClusterSpec, get, read_int

SOURCES = ("TF_CONFIG", "torchrun", "KERAS_DISTRIBUTION", "SLURM")
# With a source other than TF_CONFIG: how many of the job's processes (the
# last ones) are parameter servers.
NUM_PS_VARIABLE = "KERAS_STRATEGIES_NUM_PS"
# Variables set by a launcher that starts several ranks per SLURM task
# (torchrun, `keras-strategies launch`): SLURM then describes the launcher.
LAUNCHER_MARKERS = ("KERAS_STRATEGIES_LAUNCHED", "TORCHELASTIC_RUN_ID")
# The sources' modules, in precedence order.
_READERS = (tf_config, torchrun, keras_distribution, slurm)

__all__ = ["NUM_PS_VARIABLE", "SOURCES", "TASK_TYPES", "ClusterError", "ClusterSpec", "resolve_cluster"]


def _launched(env):
    return any(get(env, name) for name in LAUNCHER_MARKERS)


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
    spec = _resolve(env)
    if get(env, NUM_PS_VARIABLE) is not None and spec.source not in ("TF_CONFIG", "none"):
        num_ps = read_int(env, NUM_PS_VARIABLE, "the number of parameter-server processes")
        if num_ps:
            spec = spec.with_parameter_servers(num_ps, NUM_PS_VARIABLE)
    return spec


def _resolve(env):
    found = []
    for reader in _READERS:
        if reader is slurm and found and _launched(env):
            # A launcher started under srun: SLURM describes the launcher
            # (one task per node), the launcher's variables describe us.
            continue
        spec = reader.read(env)
        if spec is not None:
            found.append((reader.VARIABLES, spec))
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
