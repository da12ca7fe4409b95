"""The cluster from `TF_CONFIG`, as TensorFlow's `TFConfigClusterResolver` reads it."""

import json

from keras_strategies.cluster.spec import (
    TASK_TYPES,
    TRAINING_TYPES,
    ClusterError,
    ClusterSpec,
    get,
    locality,
    split_address,
)

VARIABLES = "TF_CONFIG"
_EXAMPLE = (
    '{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)
_TYPES = ", ".join(map(repr, TASK_TYPES))


def _load(raw):
    try:
        config = json.loads(raw)
    except ValueError as error:
        raise ClusterError(f"TF_CONFIG is not valid JSON ({error}): set it to e.g. {_EXAMPLE}.") from None
    if not isinstance(config, dict):
        raise ClusterError(f"TF_CONFIG must be a JSON object; got {raw!r}. Set it to e.g. {_EXAMPLE}.")
    return config


def _check_cluster(cluster):
    if not isinstance(cluster, dict) or not cluster:
        raise ClusterError(
            'TF_CONFIG has no "cluster" (a dict from task type to a list of '
            f'"host:port" addresses): set it to e.g. {_EXAMPLE}.'
        )
    for task_type, addresses in cluster.items():
        if task_type not in TASK_TYPES:
            raise ClusterError(f'TF_CONFIG: unknown task type {task_type!r} in "cluster": use {_TYPES}.')
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ClusterError(
                f'TF_CONFIG: "cluster"["{task_type}"] must be a list of "host:port" strings; '
                f"got {addresses!r}."
            )
        for address in addresses:
            split_address(address, f'TF_CONFIG "cluster"["{task_type}"]')
    if len(cluster.get("chief", [])) > 1:
        raise ClusterError(
            f'TF_CONFIG: "cluster"["chief"] lists {len(cluster["chief"])} addresses; there is '
            'one chief: move the others to "worker".'
        )
    if not any(cluster.get(t) for t in TRAINING_TYPES):
        raise ClusterError(
            'TF_CONFIG: "cluster" has no "chief" or "worker" task: list the '
            'training processes under "worker" (and optionally one "chief").'
        )


def _task(config, cluster):
    """`(task_type, index)` of this process, checked against the cluster."""
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise ClusterError(
            'TF_CONFIG has no "task" (this process\'s {"type": ..., "index": '
            '...}): add e.g. "task": {"type": "worker", "index": 0}.'
        )
    task_type = task["type"]
    if task_type not in TASK_TYPES:
        raise ClusterError(f'TF_CONFIG: unknown "task" type {task_type!r}: use {_TYPES}.')
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
        raise ClusterError(f'TF_CONFIG: "task" "index" must be a non-negative integer; got {index!r}.')
    if members is not None and index >= len(members):
        raise ClusterError(
            f'TF_CONFIG: "task" index {index} is out of range: "cluster"["{task_type}"] has '
            f"{len(members)} task(s), so the index must be 0..{len(members) - 1}."
        )
    return task_type, index


def read(env):
    """The `ClusterSpec` `TF_CONFIG` describes, or `None` when it is unset or `{}`."""
    raw = get(env, "TF_CONFIG")
    if raw is None:
        return None
    config = _load(raw)
    if not config:
        return None  # '{}': TensorFlow treats it as no cluster too.
    cluster = config.get("cluster")
    _check_cluster(cluster)
    task_type, index = _task(config, cluster)
    training = [a for t in TRAINING_TYPES for a in cluster.get(t, [])]
    hosts = [split_address(a, "TF_CONFIG")[0] for a in training]
    if task_type in TRAINING_TYPES:
        rank = index if task_type == "chief" else len(cluster.get("chief", [])) + index
        local_rank, local_world_size, node_rank = locality(hosts, rank)
    else:
        # A ps/evaluator task is not a training process: rank -1 (documented).
        rank = local_rank = node_rank = -1
        own = cluster[task_type][index] if cluster.get(task_type) else None
        local_world_size = hosts.count(split_address(own, "TF_CONFIG")[0]) if own else 0
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
        num_ps=len(cluster.get("ps", [])),
    )
