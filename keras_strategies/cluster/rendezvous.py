"""Tiny TCP rendezvous, each with a deadline.

- `exchange_addresses`: every worker learns every worker's address.
- `agree_nodes`: the launchers of a job's machines agree on how many
  processes each runs (so machines of different sizes make one job).

`exchange_addresses` is used where an engine needs the whole cluster's addresses (TensorFlow's
MultiWorkerMirroredStrategy) but the cluster description gives only the
coordinator's (torchrun, SLURM, KERAS_DISTRIBUTION_* with one address).
Rank 0 listens on the coordinator address; the others connect, say who they
are, and receive the full list. Every wait has a deadline.
"""

import errno
import json
import os
import socket
import time

from keras_strategies.errors import LaunchError, WorkerError


def _recv_line(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed during rendezvous")
        data += chunk
    return json.loads(data)


def _send_line(sock, payload):
    sock.sendall(json.dumps(payload).encode() + b"\n")


def exchange_addresses(coordinator, rank, world_size, port, timeout):
    """Returns every worker's `host:port`, in rank order.

    Args:
        coordinator: `"host:port"` where rank 0 listens.
        rank: this worker's rank.
        world_size: number of workers.
        port: the port this worker will serve on (its host is found from the
            connection to the coordinator).
        timeout: seconds before giving up with a `WorkerError`.

    Returns:
        A list of `world_size` addresses.
    """
    host, coordinator_port = coordinator.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    if rank == 0:
        return _serve(host, int(coordinator_port), world_size, port, deadline, timeout)
    while True:
        try:
            with socket.create_connection((host, int(coordinator_port)), timeout=5) as sock:
                sock.settimeout(max(1.0, deadline - time.monotonic()))
                own_host = sock.getsockname()[0]
                _send_line(sock, {"rank": rank, "address": f"{own_host}:{port}"})
                return _recv_line(sock)["addresses"]
        except (ConnectionRefusedError, socket.timeout, OSError) as error:
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"worker {rank} could not reach the coordinator at {coordinator} "
                    f"within {timeout:.0f}s ({error}). Check that worker 0 is running "
                    "and that every worker uses the same address."
                ) from error
            time.sleep(0.2)


def _serve(host, coordinator_port, world_size, port, deadline, timeout):
    addresses = {0: f"{host}:{port}"}
    peers = []
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        try:
            server.bind(("" if host not in ("127.0.0.1", "localhost") else host, coordinator_port))
        except OSError as error:
            raise WorkerError(
                f"worker 0 cannot listen on the coordinator port {coordinator_port} "
                f"({error}); pick a free port (MASTER_PORT / --master)."
            ) from error
        server.listen(world_size)
        while len(addresses) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(addresses))
                raise WorkerError(
                    f"worker 0 waited {timeout:.0f}s for workers {missing} to join at "
                    f"{host}:{coordinator_port}; they never came. Check that they started."
                )
            server.settimeout(remaining)
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            connection.settimeout(max(1.0, deadline - time.monotonic()))
            message = _recv_line(connection)
            addresses[int(message["rank"])] = message["address"]
            peers.append(connection)
        ordered = [addresses[r] for r in range(world_size)]
        for connection in peers:
            _send_line(connection, {"addresses": ordered})
        return ordered
    finally:
        for connection in peers:
            connection.close()
        server.close()


# -- The launchers' rendezvous: how many processes each machine runs.
#
# Before any rank starts, the launcher of every machine but node 0 connects to
# node 0's launcher at --master and says who it is; node 0 answers every one
# with the number of processes of each machine once all have arrived, or with
# the one error that stops them all. Node 0 then closes the port, which rank 0
# binds next (each other machine closes its side first, so node 0's end of the
# port is left in no TIME_WAIT).

_GOODBYE_SECONDS = 5.0  # how long node 0 waits for each machine to hang up


def _machine(hello, peer=None):
    """How a message names a machine: host name, address and launcher pid."""
    where = f"{hello['host']}, {peer}" if peer else hello["host"]
    return f"{where}, launcher pid {hello['pid']}"


def _node_list(ranks):
    return "--node-rank " + ", ".join(str(r) for r in ranks)


def agree_nodes(master, node_rank, nnodes, nproc_per_node, timeout, num_ps=0):
    """The number of processes of every machine of a job, agreed by the
    launchers of all machines before any process starts.

    Args:
        master: node 0's `"host:port"` (`--master`).
        node_rank: this machine's index; node 0 hosts the rendezvous.
        nnodes: the number of machines.
        nproc_per_node: the processes this machine runs.
        timeout: seconds node 0 waits for every machine (and each other
            machine waits to reach node 0, then for its answer).
        num_ps: this machine's `--num-ps`; every machine must give the same.

    Returns:
        A list of `nnodes` process counts, indexed by node rank.

    Raises:
        LaunchError: a machine never arrived, two claim one node rank, they
            disagree on `--nnodes` or `--num-ps`, or node 0 cannot be reached
            or cannot listen. Every launcher of the job raises it.
    """
    host, port = master.rsplit(":", 1)
    host = host.strip("[]")
    hello = {"node_rank": node_rank, "nnodes": nnodes, "nproc": nproc_per_node, "num_ps": num_ps,
             "host": socket.gethostname(), "pid": os.getpid()}
    if node_rank == 0:
        return _host_nodes(host, int(port), hello, timeout)
    return _join_nodes(host, int(port), hello, timeout)


def _listen(host, port, nnodes):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind((host, port))
    except OSError as error:
        server.close()
        if error.errno == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
            raise LaunchError(
                f"--node-rank 0 listens on --master {host}:{port}, but {host} is not an address of this "
                f"machine ({socket.gethostname()}): start --node-rank 0 on the machine at {host}, and give "
                f"every other machine its own --node-rank, 1..{nnodes - 1}."
            ) from None
        raise LaunchError(
            f"node 0 cannot listen on --master {host}:{port} ({error}): pick a free port."
        ) from None
    server.listen(nnodes)
    return server


def _host_nodes(host, port, own, timeout):
    """Node 0: collects every machine's hello, then answers them all."""
    deadline = time.monotonic() + timeout
    nnodes = own["nnodes"]
    server = _listen(host, port, nnodes)
    arrived = []  # (connection, hello, peer address), in order of arrival
    try:
        while len(arrived) < nnodes - 1:
            connection, hello, address = _next_hello(server, deadline)
            if connection is None:
                missing = sorted(set(range(1, nnodes)) - {h["node_rank"] for _, h, _ in arrived})
                them = "it" if len(missing) == 1 else "they"
                _fail(arrived, (
                    f"node 0 waited {timeout:g} s at {host}:{port} for the machine(s) with "
                    f"{_node_list(missing)} (--nnodes {nnodes}); {them} never arrived. Start the "
                    f"launcher on every machine with the same --master {host}:{port} and its own "
                    "--node-rank, or lower --nnodes; --rendezvous-timeout sets how long node 0 waits."))
            problem = _mismatch(own, arrived, hello, address)
            arrived.append((connection, hello, address))
            if problem:
                _fail(arrived, problem)
        counts = [own["nproc"]] * nnodes
        for _, hello, _ in arrived:
            counts[hello["node_rank"]] = hello["nproc"]
        server.close()  # before answering: rank 0 binds this port next
        _answer(arrived, {"counts": counts})
        return counts
    finally:
        server.close()
        for connection, _, _ in arrived:
            connection.close()


def _next_hello(server, deadline):
    """The next machine's `(connection, hello, address)`; `(None, None, None)`
    past the deadline. Connections that say nothing readable are dropped."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, None, None
        server.settimeout(remaining)
        try:
            connection, address = server.accept()
        except socket.timeout:
            continue
        connection.settimeout(max(1.0, min(10.0, deadline - time.monotonic())))
        try:
            hello = _recv_line(connection)
            if isinstance(hello, dict) and {"node_rank", "nnodes", "nproc", "host", "pid"} <= set(hello):
                return connection, hello, address[0]
        except (OSError, ValueError):
            pass
        connection.close()


def _mismatch(own, arrived, hello, address):
    """The message for a machine that does not fit the job, or `None`."""
    rank, nnodes = hello["node_rank"], own["nnodes"]
    theirs = f"node {rank} ({_machine(hello, address)})"
    if hello["nnodes"] != nnodes:
        return (f"the machines disagree on --nnodes: node 0 ({_machine(own)}) has --nnodes {nnodes}, "
                f"{theirs} has --nnodes {hello['nnodes']}. Start the launcher of every machine with the "
                "same --nnodes, the number of machines.")
    if hello.get("num_ps", 0) != own["num_ps"]:
        return (f"the machines disagree on --num-ps: node 0 ({_machine(own)}) has --num-ps "
                f"{own['num_ps']}, {theirs} has --num-ps {hello.get('num_ps', 0)}. Give every "
                "machine's launcher the same --num-ps.")
    for _, first, first_address in arrived:
        if first["node_rank"] == rank:
            return (f"two machines claim --node-rank {rank}: {_machine(first, first_address)} and "
                    f"{_machine(hello, address)}. Give each machine its own --node-rank, "
                    f"1..{nnodes - 1} (0 is the machine at --master).")
    return None


def _answer(arrived, reply):
    """Sends `reply` to every machine; waits (briefly) for each to hang up."""
    for connection, _, _ in arrived:
        try:
            _send_line(connection, reply)
        except OSError:
            pass  # that machine left: it reports its own error
    for connection, _, _ in arrived:
        connection.settimeout(_GOODBYE_SECONDS)
        try:
            connection.recv(1)
        except OSError:
            pass


def _fail(arrived, message):
    """Every machine that arrived, and this one, stop with `message`."""
    _answer(arrived, {"error": message})
    raise LaunchError(message)


def _join_nodes(host, port, own, timeout):
    """Every other machine: says hello to node 0 and waits for its answer.

    Whatever else holds the port and closes the connection without an answer
    (on a restart, the last run's rank 0, not yet gone) is tried again, until
    the deadline."""
    rank, address = own["node_rank"], f"{host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        reply, reason = _ask_node_0(_reach(host, port, rank, timeout, deadline), own, timeout)
        if isinstance(reply, dict) and "error" in reply:
            raise LaunchError(reply["error"])
        if isinstance(reply, dict) and "counts" in reply:
            return reply["counts"]
        if reason == "no answer in time" or time.monotonic() >= deadline:
            raise LaunchError(
                f"node {rank} lost node 0 at {address} during the rendezvous ({reason}): see node 0's "
                "output for why, then start the launcher of every machine again."
            )
        time.sleep(0.2)


def _ask_node_0(connection, own, timeout):
    """`(reply, None)`, or `(None, why there is none)`."""
    with connection:
        # node 0 answers within its own timeout, which started before we connected
        connection.settimeout(timeout + _GOODBYE_SECONDS)
        try:
            _send_line(connection, own)
            return _recv_line(connection), None
        except socket.timeout:
            return None, "no answer in time"
        except (OSError, ValueError) as error:
            return None, str(error)


def _reach(host, port, rank, timeout, deadline):
    """A connection to node 0, retried until `deadline` (`timeout` seconds
    after this machine's launcher began to wait)."""
    while True:
        try:
            return socket.create_connection((host, port), timeout=max(0.5, min(5.0, deadline - time.monotonic())))
        except OSError as error:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"node {rank} could not reach node 0 at {host}:{port} within {timeout:g} s ({error}). "
                    f"Start the launcher with --node-rank 0 on the machine at {host}, with the same "
                    "--master; --rendezvous-timeout sets how long to wait."
                ) from None
            time.sleep(0.2)
