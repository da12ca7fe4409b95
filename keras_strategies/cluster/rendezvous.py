"""A tiny TCP rendezvous: every worker learns every worker's address.

Used where an engine needs the whole cluster's addresses (TensorFlow's
MultiWorkerMirroredStrategy) but the cluster description gives only the
coordinator's (torchrun, SLURM, KERAS_DISTRIBUTION_* with one address).
Rank 0 listens on the coordinator address; the others connect, say who they
are, and receive the full list. Every wait has a deadline.
"""

import json
import socket
import time

from keras_strategies.errors import WorkerError


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
