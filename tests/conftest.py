"""Test setup: the suite runs once per backend (KERAS_BACKEND set per run).

On a CPU-only machine two replicas come from two logical (TensorFlow) or
virtual (JAX) CPU devices. They exist only if asked for before the backend
starts, so a strategy over them is created here, at collection time, which
is also the documented way for a user.
"""

import os

import keras
import pytest

import keras_strategies as ks

BACKEND = keras.backend.backend()

if BACKEND in ("tensorflow", "jax"):
    REPLICA_DEVICES = ["cpu:0", "cpu:1"]
    ks.Mirrored(devices=REPLICA_DEVICES)  # before the backend starts
else:
    REPLICA_DEVICES = ["cpu:0"]  # torch: one process = one CPU device


@pytest.fixture
def replica_devices():
    return list(REPLICA_DEVICES)


def pytest_report_header(config):
    return f"keras backend: {BACKEND} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')})"


def _descendants():
    """`{pid: command line}` of every live process descended from this one (Linux /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":  # a zombie holds nothing
                    parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        found[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
                except OSError:
                    found[pid] = "?"
                frontier.append(pid)
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind(request):
    """Every test must end the processes it starts (a leftover one can hold the
    suite's output open until its own timeout): one still alive 5 s after the
    test is killed, and the test errors naming it."""
    import signal
    import time

    yield
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + 5
    left = _descendants()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _descendants()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if left:
        named = "; ".join(f"{pid}: {command}" for pid, command in left.items())
        pytest.fail(f"{request.node.nodeid} left process(es) running (killed now): {named}", pytrace=False)
