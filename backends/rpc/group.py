"""The job's RPC group: who joins under which name and rank, and how it ends.

The group is dynamic (`init_rpc(world_size=None)`): processes join in any
order, and a worker restarted after a crash joins again under its old name
with a new rank (`rank = process index + processes * incarnation`, the
incarnation counted in the group's store); the chief first removes the dead
incarnation from the group (`evict`).
"""

import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from keras_strategies.backends.torch.store import loopback_init_method
from keras_strategies.cluster.spec import is_loopback
from keras_strategies.implementation.multi_process import loopback_interface

_INCARNATIONS = "keras_strategies/incarnation/"
_ALL = "names/_ALL_WORKER_INFOS"  # torch's TensorPipe agent keeps the members here


def process_name(cluster):
    """`"chief"`, `"worker<i>"` or `"ps<i>"`."""
    return "chief" if cluster.task_type == "chief" else f"{cluster.task_type}{cluster.task_index}"


def worker_names(cluster):
    return [f"worker{i}" for i in range(cluster.world_size - 1)]


def server_names(cluster):
    return [f"ps{i}" for i in range(cluster.num_ps)]


def _options(init_method, timeout, processes):
    return rpc.TensorPipeRpcBackendOptions(
        init_method=init_method,
        num_worker_threads=max(16, 2 * processes + 4),
        rpc_timeout=timeout,
        # TCP only, one channel: 9 threads and 1 port per process instead of
        # 28 and 17, about twice the updates/s on a small CPU machine.
        _transports=["uv"],
        _channels=["basic"],
    )


def join(cluster, coordinator, timeout):
    """Joins the job's RPC group.

    Args:
        cluster: this process's `ClusterSpec`.
        coordinator: `"host:port"` of the group's store (the chief hosts it).
        timeout: seconds to wait for the store and for each call.

    Returns:
        `(name, rank)` this process joined as.
    """
    host, port = coordinator.rsplit(":", 1)
    init_method = f"tcp://{coordinator}"
    if is_loopback(host):  # every peer is here: the store and TensorPipe listen on loopback only
        os.environ.setdefault("TP_SOCKET_IFNAME", loopback_interface())
        init_method = loopback_init_method("127.0.0.1" if host == "localhost" else host, int(port))
    name = process_name(cluster)
    processes = cluster.world_size + cluster.num_ps
    incarnation = 0
    if name != "chief":
        store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout))
        incarnation = store.add(_INCARNATIONS + name, 1) - 1
    rank = cluster.process_index + processes * incarnation
    rpc.init_rpc(name, rank=rank, world_size=None,
                 rpc_backend_options=_options(init_method, timeout, processes))
    return name, rank


def ping():
    """Answered by every member: it is alive."""
    return True


def alive(name, timeout):
    """Whether member `name` answers a ping within `timeout` seconds."""
    try:
        rpc.rpc_sync(name, ping, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure: not there
        return False


def forget(name, rank):
    """Run on a member: drops a dead member from this agent's tables."""
    agent = rpc.api._get_current_rpc_agent()
    agent._update_group_membership(rpc.WorkerInfo(name, rank), [], {}, False)
    return True


def evict(name, rank, members, timeout):
    """The chief removes a dead member from the group (the store and every
    live member), so that a restarted process can join under its name.

    Uses the TensorPipe agent's own bookkeeping (torch 2.x: the store keys
    `names/<rank>` and `names/_ALL_WORKER_INFOS`, and
    `_update_group_membership`); a torch without them makes a restarted
    worker unable to join, and nothing else.

    Args:
        name, rank: the dead member.
        members: the names of the live members besides the chief.
        timeout: seconds per call.

    Returns:
        True when every step worked.
    """
    try:
        store = rpc.api._get_current_rpc_agent().store
        store.set(_ALL, store.get(_ALL).decode().replace(f"{name}-{rank},", ""))
        store.delete_key(f"names/{rank}")
        calls = [rpc.rpc_async(m, forget, args=(name, rank), timeout=timeout) for m in members]
        forget(name, rank)
        for call in calls:
            try:
                call.wait()
            except Exception:  # noqa: BLE001 - a member that died meanwhile is evicted in turn
                pass
        return True
    except Exception:  # noqa: BLE001 - see the docstring
        return False


def leave():
    """Leaves the group at once (a graceful leave waits for dead peers for ever)."""
    try:
        rpc.shutdown(graceful=False)
    except Exception:  # noqa: BLE001 - leaving anyway
        pass


def to_wire(value):
    """A backend value (torch tensor, JAX or numpy array) as a torch tensor to send."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    import numpy as np

    return torch.from_numpy(np.array(value, copy=True))
