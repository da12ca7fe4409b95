"""A `torch.distributed` store that listens on one address.

torch's own `tcp://` rendezvous starts its TCPStore server on every network
interface. When every process of a job is on this machine, the store should
listen on the loopback address only: `loopback_init_method` returns an
`init_method` URL (`kstcp://host:port`) for `init_process_group` and
`init_rpc` whose server socket is bound to `host` first and then handed to
the TCPStore (`master_listen_fd`). Everything else is torch's `tcp://`.
"""

import datetime
import socket
from urllib.parse import parse_qsl, urlparse

import torch.distributed as dist

SCHEME = "kstcp"
_registered = []


def listening_store(host, port, world_size, is_master, timeout):
    """A TCPStore at `host:port`; on the master, its server listens on `host` only.

    Args:
        host, port: the store's address (an IPv4 or IPv6 address).
        world_size: the number of members, or `None` for a dynamic group.
        is_master: whether this process runs the server.
        timeout: a `datetime.timedelta` for the store's operations.

    Returns:
        A `torch.distributed.TCPStore`.
    """
    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout, multi_tenant=True)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return dist.TCPStore(host, port, world_size, True, timeout=timeout, wait_for_workers=False,
                         multi_tenant=True, master_listen_fd=listener.detach())


def _handler(url, timeout=datetime.timedelta(minutes=30), **kwargs):
    parsed = urlparse(url)
    query = dict(parse_qsl(parsed.query))
    rank, world_size = int(query["rank"]), int(query.get("world_size", -1))
    store = listening_store(parsed.hostname, parsed.port, None if world_size < 0 else world_size, rank == 0,
                            timeout)
    yield store, rank, world_size
    raise RuntimeError(f"{SCHEME}:// cannot rendezvous a second time")


def loopback_init_method(host, port):
    """The `init_method` URL of a store listening on `host` (a loopback address) only.

    Returns:
        `"kstcp://host:port"` (the handler is registered with torch on first use).
    """
    if not _registered:
        dist.register_rendezvous_handler(SCHEME, _handler)
        _registered.append(True)
    return f"{SCHEME}://[{host}]:{port}" if ":" in host else f"{SCHEME}://{host}:{port}"
