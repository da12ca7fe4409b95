"""TCP port helpers for the cluster description and the launcher (no backend import)."""

import errno
import random
import socket


def _bind_address(host, port):
    """Returns `(family, sockaddr)` for binding `host:port` (IPv4 or IPv6)."""
    infos = socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def free_port(host="127.0.0.1"):
    """Returns a TCP port that is free on `host` right now.

    The operating system picks the port; it stays free until someone binds it,
    so use it soon (another process could take it in between).

    Args:
        host: the address to probe, `"127.0.0.1"` by default.

    Returns:
        A port number (int).

    Example:
    >>> port = free_port()
    >>> 0 < port < 65536
    True
    """
    family, sockaddr = _bind_address(host, 0)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(sockaddr)
        return sock.getsockname()[1]


_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_QUIET_PORTS_FROM = 20000  # the lowest port `quiet_port` picks


def _ephemeral_range():
    """`(first, last)` of the ports the kernel hands out by itself (outgoing
    connections, `bind(("", 0))`), or `None` where it cannot be read."""
    try:
        with open(_EPHEMERAL_RANGE_FILE) as f:
            first, last = (int(v) for v in f.read().split())
        return first, last
    except (OSError, ValueError):
        return None


def quiet_port(host="127.0.0.1", attempts=100):
    """Returns a free TCP port for a server that another process starts later.

    `free_port`'s answer comes from the kernel's ephemeral range, the range
    every outgoing connection takes its local port from: in the seconds
    before the other process binds it, any connection on the machine may get
    it, and that server then fails to start ("address already in use",
    "Could not start gRPC server"). This picks a free port below that range
    (20000 up to its start; Linux: 32768), which the kernel never hands out by
    itself, so only an explicit bind of the same number can take it. Where
    the range cannot be read or leaves no room below it, `free_port(host)`.

    Args:
        host: the address to check the port on, `"127.0.0.1"` by default.
        attempts: random ports tried before falling back to `free_port`.

    Returns:
        A port number (int).

    Example:
    >>> 0 < quiet_port() < 65536
    True
    """
    span = _ephemeral_range()
    if span is not None and span[0] - _QUIET_PORTS_FROM >= 1000:
        generator = random.SystemRandom()
        for _ in range(attempts):
            port = generator.randrange(_QUIET_PORTS_FROM, span[0])
            if not port_in_use(host, port):
                return port
    return free_port(host)


class PortReservation:
    """A TCP port held for a server that this process starts later.

    `free_port` answers a port that is free *now*; between that answer and the
    server's bind, any other socket on the machine may take it (a connection
    to anywhere gets its local port from the same range), and the server then
    fails to start ("Could not start gRPC server", "address already in use").
    A reservation keeps the port bound, with `SO_REUSEADDR` and not listening,
    until `close()`: the kernel gives it to no `bind(("", 0))` and no outgoing
    connection, while a server that binds it with `SO_REUSEADDR` (gRPC, for
    TensorFlow and JAX; torch's `TCPStore`; our rendezvous) starts beside it.
    A server binding without `SO_REUSEADDR` would fail: hold a port only for
    a server of known make (for another process's, see `quiet_port`).

    Attributes:
        host: the address bound.
        port: the port held (int).

    Example:
    >>> with reserve_port() as reservation:
    ...     0 < reservation.port < 65536
    True
    """

    def __init__(self, host="127.0.0.1"):
        family, sockaddr = _bind_address(host, 0)
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind(sockaddr)
        except OSError:
            self._socket.close()
            raise
        self.host = host
        self.port = self._socket.getsockname()[1]

    def close(self):
        """Lets the port go (once the server that uses it has started)."""
        self._socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def reserve_port(host="127.0.0.1"):
    """Returns a `PortReservation`: a free port, held until its `close()`.

    Args:
        host: the address to hold the port on, `"127.0.0.1"` by default.

    Returns:
        A `PortReservation`; its `port` is the number to give the server.
    """
    return PortReservation(host)


def port_in_use(host, port):
    """Says whether something on this machine already holds `host:port`.

    Binds the port with `SO_REUSEADDR`, as rendezvous servers (gloo, gRPC,
    torch's TCPStore) do, so a port left in `TIME_WAIT` by a finished job
    counts as free and a listening or bound one counts as in use.

    Args:
        host: an address of this machine (`"127.0.0.1"`, a hostname...).
        port: the TCP port number.

    Returns:
        `True` when binding fails because the address is in use; `False`
        otherwise (including when `host` is not an address of this machine,
        where nothing can be said).

    Example:
    >>> import socket
    >>> with socket.socket() as s:
    ...     s.bind(("127.0.0.1", 0)); s.listen()
    ...     port_in_use("127.0.0.1", s.getsockname()[1])
    True
    """
    try:
        family, sockaddr = _bind_address(host, port)
    except OSError:
        return False
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False
