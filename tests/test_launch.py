"""The launcher: real rank processes on 127.0.0.1, running a tiny plain-Python script.

The scripts import nothing heavy. The launcher itself runs in-process where
possible; the SIGINT and console-script tests start it as a subprocess (with
KERAS_BACKEND=numpy: the launcher needs no backend, and imports none).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keras_strategies.launch import job as launch_module
from keras_strategies.launch import ports as launch_ports
from keras_strategies.cluster import resolve_cluster
from keras_strategies.launch import LaunchError, cli, launch, main, rank_thread_settings

SCRIPT = r'''
import os, signal, subprocess, sys, time

out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])


def write(name, text):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, name))


def wait_for(name):
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(out, name)):
        if time.monotonic() > deadline:
            sys.exit("gave up waiting for " + name)
        time.sleep(0.02)


if mode == "print":
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
            "MASTER_ADDR", "MASTER_PORT", "KERAS_STRATEGIES_LAUNCHED", "OMP_NUM_THREADS")
    print(" ".join("%s=%s" % (k, os.environ.get(k)) for k in keys))
    print("stderr of rank %d" % rank, file=sys.stderr)
    sys.stdout.write("no newline at the end")
    sys.exit(0)

if mode == "ps-roles":
    print("num_ps=%s" % os.environ.get("KERAS_STRATEGIES_NUM_PS"))
    if rank == 1:  # worker 0 of a parameter-server job fails
        sys.exit(3)
    sys.exit(0)

if mode.startswith("fail") and rank == 1:
    wait_for("rank0.pid")
    print("rank 1 fails now", file=sys.stderr)
    sys.exit(3)

if mode == "fail-stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the grandchild inherits it too
# A grandchild in the rank's process group: stopping must reach it too.
child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.1)"])
write("child%d.pid" % rank, str(child.pid))
write("rank%d.pid" % rank, str(os.getpid()))
while True:
    time.sleep(0.1)
'''


FOREIGN = ("TF_CONFIG", "KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
           "KERAS_DISTRIBUTION_PROCESS_ID")


@pytest.fixture(autouse=True)
def no_other_cluster(monkeypatch):
    for name in FOREIGN:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "rank_script.py"
    path.write_text(SCRIPT)
    return path


def wait_for_file(path, seconds=60):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.02)
    return path


def is_dead(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie waiting for init to reap it is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def assert_dead(pids, seconds=5):
    deadline = time.monotonic() + seconds
    while not all(is_dead(pid) for pid in pids):
        if time.monotonic() > deadline:
            alive = [pid for pid in pids if not is_dead(pid)]
            for pid in alive:  # do not leak them into the next tests
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes still alive after the launcher returned: {alive}")
        time.sleep(0.02)


def sigterm_to_this_process_when(paths):
    """A started thread that sends SIGTERM to this process (the in-process
    launcher's handler) once every path exists."""
    def send():
        for path in paths:
            wait_for_file(path)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def pids_in(directory):
    return [int(p.read_text()) for p in Path(directory).glob("*.pid")]


def launcher_env():
    return dict(os.environ, KERAS_BACKEND="numpy")


def check_prefixed_output(out, err):
    lines = out.splitlines()
    ports = set()
    for rank in (0, 1):
        (line,) = [x for x in lines if x.startswith(f"[rank {rank}] RANK=")]
        fields = dict(item.split("=", 1) for item in line.split("] ", 1)[1].split())
        assert fields["RANK"] == str(rank)
        assert fields["WORLD_SIZE"] == "2"
        assert fields["LOCAL_RANK"] == str(rank)
        assert fields["LOCAL_WORLD_SIZE"] == "2"
        assert fields["GROUP_RANK"] == "0"
        assert fields["MASTER_ADDR"] == "127.0.0.1"
        assert fields["KERAS_STRATEGIES_LAUNCHED"] == "1"
        ports.add(fields["MASTER_PORT"])
        spec = resolve_cluster(fields)  # what the rank's strategy will read
        assert (spec.source, spec.rank, spec.world_size) == ("torchrun", rank, 2)
        assert spec.coordinator == f"127.0.0.1:{fields['MASTER_PORT']}"
        assert f"[rank {rank}] no newline at the end" in lines
        assert f"[rank {rank}] stderr of rank {rank}" in err.splitlines()
    assert len(ports) == 1
    port = int(ports.pop())
    span = launch_ports._ephemeral_range()
    if span is not None and span[0] - 20000 >= 1000:  # the launcher's quiet_port: below the kernel's own range
        assert 20000 <= port < span[0], (port, span)


@pytest.mark.timeout(60)
def test_two_ranks_output_prefixed(script, tmp_path, capfd):
    code = launch([sys.executable, str(script), str(tmp_path), "print"], nproc_per_node=2,
                  timeout=50)
    out, err = capfd.readouterr()
    assert code == 0, err
    check_prefixed_output(out, err)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["fail", "fail-stubborn"])
def test_failing_rank_stops_the_others(script, tmp_path, capfd, monkeypatch, mode):
    monkeypatch.setattr(launch_module, "GRACE_SECONDS", 0.5)
    try:
        code = launch([sys.executable, str(script), str(tmp_path), mode], nproc_per_node=2,
                      timeout=50)
        out, err = capfd.readouterr()
        assert code == 3, err
        assert "[rank 1] rank 1 fails now" in err
        assert "rank 1" in err and "exited with code 3" in err
        pids = pids_in(tmp_path)
        assert len(pids) == 2  # rank 0 and its child
    finally:
        assert_dead(pids_in(tmp_path))


@pytest.mark.timeout(60)
def test_parameter_server_roles_and_a_failed_worker_does_not_stop_the_job(script, tmp_path, capfd):
    code = launch([sys.executable, str(script), str(tmp_path), "ps-roles"], nproc_per_node=4, num_ps=1,
                  timeout=50)
    out, err = capfd.readouterr()
    assert code == 0, err
    for label in ("chief", "worker 0", "worker 1", "ps 0"):
        assert f"[{label}] num_ps=1" in out.splitlines(), out
    assert "worker 0 (rank 1" in err and "exited with code 3; the job goes on without it" in err
    with pytest.raises(LaunchError, match="leaves no worker"):
        launch([sys.executable, str(script), str(tmp_path), "ps-roles"], nproc_per_node=3, num_ps=2)


@pytest.mark.timeout(30)
def test_timeout_stops_every_rank(script, tmp_path, capfd):
    try:
        code = launch([sys.executable, str(script), str(tmp_path), "sleep"], nproc_per_node=2,
                      timeout=2)
        err = capfd.readouterr().err
        assert code == launch_module.TIMEOUT_EXIT_CODE
        assert "timed out after 2 s" in err
    finally:
        assert_dead(pids_in(tmp_path))


@pytest.mark.timeout(60)
def test_sigterm_to_the_launcher_stops_all_ranks(script, tmp_path, capfd):
    sender = sigterm_to_this_process_when([tmp_path / f"rank{rank}.pid" for rank in (0, 1)])
    try:
        code = launch([sys.executable, str(script), str(tmp_path), "sleep"], nproc_per_node=2,
                      timeout=50)
        assert code == 143
        assert "SIGTERM" in capfd.readouterr().err
    finally:
        sender.join(timeout=60)
        assert_dead(pids_in(tmp_path))
    assert len(pids_in(tmp_path)) == 4


@pytest.mark.timeout(90)
def test_sigint_stops_all_ranks(script, tmp_path):
    launcher = subprocess.Popen(
        [sys.executable, "-m", "keras_strategies.launch", "--nproc-per-node", "2",
         "--timeout", "80", str(script), str(tmp_path), "sleep"],
        env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        for rank in (0, 1):
            wait_for_file(tmp_path / f"rank{rank}.pid")
        launcher.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = launcher.communicate(timeout=15)
        assert time.monotonic() - start < 10
        assert launcher.returncode == 130, err.decode()
        assert b"SIGINT" in err
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)
        assert_dead(pids_in(tmp_path))
    assert len(pids_in(tmp_path)) == 4  # two ranks, two grandchildren


@pytest.mark.timeout(90)
def test_console_script(script, tmp_path):
    exe = shutil.which("keras-strategies", path=str(Path(sys.executable).parent))
    assert exe, "the keras-strategies console script is not installed (pip install -e .)"
    result = subprocess.run(
        [exe, "launch", "--nproc-per-node", "2", str(script), str(tmp_path), "print"],
        env=launcher_env(), capture_output=True, text=True, timeout=80,
    )
    assert result.returncode == 0, result.stderr
    check_prefixed_output(result.stdout, result.stderr)


@pytest.mark.parametrize("how", ["module", "console_script"])
def test_the_launcher_imports_no_engine(how):
    """Its own process starts in a fraction of a second: no keras, no engine."""
    exe = shutil.which("keras-strategies", path=str(Path(sys.executable).parent))
    command = ([sys.executable, "-X", "importtime", "-m", "keras_strategies.launch", "--help"]
               if how == "module" else [sys.executable, "-X", "importtime", exe, "launch", "--help"])
    result = subprocess.run(command, env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "keras_strategies.launch" in imported or how == "module"
    assert not imported & {"keras", "tensorflow", "jax", "torch"}, sorted(imported)


def test_nnodes_without_master_is_an_error(capsys):
    assert main(["--nnodes", "2", "train.py"]) == 2
    err = capsys.readouterr().err
    assert "--master" in err and "--nnodes 2" in err
    with pytest.raises(LaunchError, match="--master"):
        launch([sys.executable, "train.py"], nnodes=2, node_rank=1)


def test_master_port_in_use_is_an_error(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli(["launch", "--master", f"127.0.0.1:{port}", "train.py"]) == 2
        err = capsys.readouterr().err
        assert f"port {port}" in err and "in use" in err
        # The Python API checks it too.
        with pytest.raises(LaunchError, match="in use"):
            launch([sys.executable, "train.py"], nnodes=2, master=f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(nproc_per_node=0), "--nproc-per-node"),
        (dict(nnodes=2, node_rank=2, master="127.0.0.1:1"), "--node-rank"),
        (dict(master="nohost"), "--master"),
        (dict(master="127.0.0.1:http"), "--master"),
        (dict(timeout=0), "--timeout"),
        (dict(env={"TF_CONFIG": '{"cluster": {}}'}), "TF_CONFIG"),
    ],
)
def test_bad_options(kwargs, fragment):
    with pytest.raises(LaunchError) as info:
        launch([sys.executable, "train.py"], **kwargs)
    assert fragment in str(info.value)


def test_bad_command():
    with pytest.raises(LaunchError, match="list of strings"):
        launch("python train.py")
    with pytest.raises(LaunchError, match="cannot start rank 0"):
        launch(["/nonexistent/interpreter", "train.py"])


def test_cli_needs_the_launch_command(capsys):
    assert cli([]) == 2
    assert cli(["train", "x.py"]) == 2
    assert "launch" in capsys.readouterr().err


def test_thread_settings():
    one = rank_thread_settings(2, environ={}, cpu_count=2)
    assert one["OMP_NUM_THREADS"] == one["MKL_NUM_THREADS"] == "1"
    assert one["TF_NUM_INTRAOP_THREADS"] == one["TF_NUM_INTEROP_THREADS"] == "1"
    assert one["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    four = rank_thread_settings(2, environ={}, cpu_count=9)
    assert four["OMP_NUM_THREADS"] == "4" and four["TF_NUM_INTEROP_THREADS"] == "2"
    assert "XLA_FLAGS" not in four
    assert rank_thread_settings(4, environ={}, cpu_count=2)["OMP_NUM_THREADS"] == "1"
    # The user's own settings are kept; other XLA flags are extended.
    user = rank_thread_settings(
        2, environ={"OMP_NUM_THREADS": "3", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}, cpu_count=2)
    assert "OMP_NUM_THREADS" not in user
    assert user["XLA_FLAGS"].startswith("--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false")
    kept = rank_thread_settings(
        2, environ={"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}, cpu_count=2)
    assert "XLA_FLAGS" not in kept


# -- --max-restarts and SIGTERM forwarding. The launcher does not depend on the
# backend: these run in the torch run only (the other runs would repeat them).

from conftest import BACKEND  # noqa: E402

from keras_strategies.launch import launch_with_restarts  # noqa: E402
from keras_strategies.launch.ports import free_port  # noqa: E402

once = pytest.mark.skipif(BACKEND != "torch", reason="the launcher needs no backend: run in the torch run only")

RESTART_SCRIPT = r'''
import os, signal, socket, sys, time

out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
attempt = int(os.environ["KERAS_STRATEGIES_RESTART_COUNT"])
port = int(os.environ["MASTER_PORT"])


def write(name, text=""):
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def wait_for(name, seconds=30):
    deadline = time.monotonic() + seconds
    while not os.path.exists(os.path.join(out, name)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def hang():
    while True:
        time.sleep(0.1)


names = ("KERAS_STRATEGIES_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT", "KERAS_STRATEGIES_MAX_RESTARTS",
         "TORCHELASTIC_MAX_RESTARTS", "MASTER_PORT")
write("a%d-rank%d" % (attempt, rank), " ".join("%s=%s" % (k, os.environ[k]) for k in names))
write("a%d-rank%d.pid" % (attempt, rank), str(os.getpid()))

if mode == "killed" and attempt == 0:
    # A rendezvous on MASTER_PORT whose server closes first: the port is left
    # in TIME_WAIT. Rank 1 then dies by SIGKILL; rank 0 waits for ever.
    if rank == 0:
        server = socket.socket()
        server.bind(("127.0.0.1", port))
        server.listen()
        connection, _ = server.accept()
        connection.close()
        server.close()
        write("a0-closed")
        hang()
    deadline = time.monotonic() + 30
    while True:  # rank 0 may not be listening yet (a loaded machine)
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=30)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    client.recv(1)  # until rank 0 closed
    wait_for("a0-closed")
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "killed":  # a later attempt: rank 0 binds the port again, without SO_REUSEADDR
    if rank == 0:
        socket.socket().bind(("127.0.0.1", port))
    sys.exit(0)

if mode == "exhausted":  # rank 0 finishes, then rank 1 fails, every time
    if rank == 0:
        sys.exit(0)
    wait_for("a%d-rank0.pid" % attempt)
    time.sleep(0.3)  # rank 0 has exited by now
    sys.exit(3)

if mode == "finish-apart":  # rank 0 finishes first, rank 1 a moment later
    time.sleep(0.6 * rank)
    sys.exit(0)

if mode == "hung" and attempt == 0:
    if rank == 1:  # hangs, deaf to SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        hang()
    # The watchdog of a worker that waits for a hung peer: a tiny timeout, then exit 75.
    if not wait_for("a0-step-rank1", seconds=0.5):
        sys.stderr.write("keras_strategies.WorkerError: no step finished for 0.5s (a worker died or hung). "
                         "Ending this worker (exit code 75).\n")
        os._exit(75)
if mode == "hung":
    sys.exit(0)

if mode in ("sigterm-save", "sigterm-deaf"):
    def save_and_exit(signum, frame):
        time.sleep(0.8)  # longer than the launcher's grace after a failure (0.2 s in the test)
        write("saved-rank%d" % rank)
        os._exit(75)
    signal.signal(signal.SIGTERM, save_and_exit if mode == "sigterm-save" else signal.SIG_IGN)
    write("ready-rank%d" % rank)
    hang()

if mode == "pair":  # two machines: rank 0 on node 0 serves, rank 1 on node 1 joins
    if rank == 0:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        connection, _ = server.accept()
        connection.sendall(b"%d\n" % attempt)
        peer = connection.makefile().readline().strip()
        if peer == "":  # the peer died. As an engine does, notice it late (its server still
            # listening, closing whoever connects), then exit 75 as the watchdog would.
            server.settimeout(0.1)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                try:
                    server.accept()[0].close()
                except OSError:
                    pass
            sys.exit(75)
        write("met-a%d" % attempt, peer)
        sys.exit(0)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                server_attempt = client.makefile().readline().strip()
                if not server_attempt:
                    raise ConnectionError("closed")
                if attempt == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                client.sendall(b"%d\n" % attempt)
                sys.exit(0)
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("node 1 never met node 0")
            time.sleep(0.1)
'''


@pytest.fixture
def restart_script(tmp_path):
    path = tmp_path / "restart_script.py"
    path.write_text(RESTART_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    return path, out


def attempt_files(out, rank):
    """`{attempt: {variable: value}}` of the runs of `rank`."""
    runs = {}
    for path in Path(out).glob(f"a*-rank{rank}"):
        runs[int(path.name[1:].split("-")[0])] = dict(item.split("=") for item in path.read_text().split())
    return runs


def all_pids(out):
    return [int(p.read_text()) for p in Path(out).glob("*.pid")]


@once
@pytest.mark.timeout(60)
def test_max_restarts_a_rank_killed_by_sigkill_finishes_on_the_second_run(restart_script, capfd):
    script, out = restart_script
    try:
        code = launch_with_restarts([sys.executable, str(script), str(out), "killed"], max_restarts=2,
                                    nproc_per_node=2, timeout=50)
        err = capfd.readouterr().err
        assert code == 0, err
        assert "rank 1 (pid" in err and "was killed by SIGKILL" in err
        assert ("restart 1 of 2: the last run ended because rank 1 (pid "
                f"{(out / 'a0-rank1.pid').read_text()}) was killed by SIGKILL") in err
        assert "restart 2" not in err and "gave up" not in err
        for rank in (0, 1):
            runs = attempt_files(out, rank)
            assert sorted(runs) == [0, 1]
            for attempt, variables in runs.items():  # our names and torchrun's
                assert variables["KERAS_STRATEGIES_RESTART_COUNT"] == variables["TORCHELASTIC_RESTART_COUNT"] \
                    == str(attempt)
                assert variables["KERAS_STRATEGIES_MAX_RESTARTS"] == variables["TORCHELASTIC_MAX_RESTARTS"] == "2"
        # A fresh port for the second run: the first one is in TIME_WAIT, and
        # rank 0 of the second run binds it without SO_REUSEADDR.
        ports = {attempt: run["MASTER_PORT"] for attempt, run in attempt_files(out, 0).items()}
        assert ports[0] != ports[1]
    finally:
        assert_dead(all_pids(out))


@once
@pytest.mark.timeout(60)
def test_max_restarts_exhausted_exits_with_the_last_code(restart_script, capfd):
    script, out = restart_script
    code = main(["--nproc-per-node", "2", "--max-restarts", "1", "--timeout", "50",
                 str(script), str(out), "exhausted"])
    err = capfd.readouterr().err
    assert code == 3, err
    assert "restart 1 of 1: the last run ended because rank 1 (pid" in err
    # rank 0 had finished: it runs again, since a synchronous job needs every rank
    assert "rank 0 had exited 0 and is started again too" in err
    assert "gave up after 1 restart: the last run ended because rank 1 (pid" in err
    assert "exited with code 3; exiting with 3." in err
    assert sorted(attempt_files(out, 0)) == sorted(attempt_files(out, 1)) == [0, 1]


@once
@pytest.mark.timeout(60)
def test_timeout_counts_the_restarts_too(restart_script, capfd):
    script, out = restart_script
    start = time.monotonic()
    code = launch_with_restarts([sys.executable, str(script), str(out), "exhausted"], max_restarts=100,
                                nproc_per_node=2, timeout=1.5)
    err = capfd.readouterr().err
    assert code == launch_module.TIMEOUT_EXIT_CODE, err
    assert "timed out after" in err and "gave up" not in err
    assert 1 <= len(attempt_files(out, 0)) < 20 and time.monotonic() - start < 10


@once
@pytest.mark.timeout(60)
def test_max_restarts_ranks_that_exit_0_are_not_restarted(restart_script, capfd):
    script, out = restart_script
    code = launch_with_restarts([sys.executable, str(script), str(out), "finish-apart"], max_restarts=2,
                                nproc_per_node=2, timeout=50)
    err = capfd.readouterr().err
    assert code == 0, err
    assert "restart" not in err
    assert sorted(attempt_files(out, 0)) == sorted(attempt_files(out, 1)) == [0]


@once
@pytest.mark.timeout(60)
def test_max_restarts_a_hung_rank_is_stopped_and_restarted(restart_script, capfd, monkeypatch):
    script, out = restart_script
    monkeypatch.setenv("KERAS_STRATEGIES_TERM_GRACE", "0.5")  # the hung rank ignores SIGTERM
    try:
        code = launch_with_restarts([sys.executable, str(script), str(out), "hung"], max_restarts=1,
                                    nproc_per_node=2, timeout=50)
        err = capfd.readouterr().err
        assert code == 0, err
        assert "[rank 0] keras_strategies.WorkerError: no step finished" in err
        assert "restart 1 of 1: the last run ended because rank 0 (pid" in err
        assert "exited with code 75 (preempted" in err
        assert sorted(attempt_files(out, 1)) == [0, 1]
        assert is_dead(int((out / "a0-rank1.pid").read_text()))  # the hung one was stopped
    finally:
        assert_dead(all_pids(out))


@once
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["sigterm-save", "sigterm-deaf"])
def test_sigterm_is_forwarded_the_ranks_save_and_the_launcher_exits_75_without_restarting(
        restart_script, capfd, monkeypatch, mode):
    script, out = restart_script
    monkeypatch.setattr(launch_module, "GRACE_SECONDS", 0.2)  # the grace after a failure: not this one
    monkeypatch.setenv("KERAS_STRATEGIES_TERM_GRACE", "10" if mode == "sigterm-save" else "0.5")
    sender = sigterm_to_this_process_when([out / f"ready-rank{rank}" for rank in (0, 1)])
    start = time.monotonic()
    try:
        code = launch_with_restarts([sys.executable, str(script), str(out), mode], max_restarts=2,
                                    nproc_per_node=2, timeout=50)
        err = capfd.readouterr().err
        assert "got SIGTERM; sending SIGTERM to every rank and waiting up to" in err
        assert "restart" not in err.replace("No restart", "")
        assert sorted(attempt_files(out, 0)) == [0]
        if mode == "sigterm-save":  # they were given the time to save, and said so
            assert code == 75, err
            assert (out / "saved-rank0").exists() and (out / "saved-rank1").exists()
            assert "exiting with 75: run the job again to resume" in err
        else:  # ranks deaf to SIGTERM are killed after KERAS_STRATEGIES_TERM_GRACE
            assert code == 143, err
            assert time.monotonic() - start < 8
    finally:
        sender.join(timeout=60)
        assert_dead(all_pids(out))


@once
@pytest.mark.timeout(90)
def test_max_restarts_two_launchers_as_two_machines_restart_and_meet_again(restart_script):
    script, out = restart_script
    master = f"127.0.0.1:{free_port()}"
    launchers = [
        subprocess.Popen([sys.executable, "-m", "keras_strategies.launch", "--nnodes", "2", "--node-rank",
                          str(node), "--master", master, "--max-restarts", "2", "--timeout", "60",
                          str(script), str(out), "pair"],
                         env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    try:
        results = [launcher.communicate(timeout=80) for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait(timeout=10)
        assert_dead(all_pids(out))
    errs = [err for _, err in results]
    assert [launcher.returncode for launcher in launchers] == [0, 0], errs
    # node 1's rank died by SIGKILL; node 0's lost its peer and exited 75: each node restarted its own
    assert "restart 1 of 2: the last run ended because rank 1 (pid" in errs[1] and "SIGKILL" in errs[1]
    assert "restart 1 of 2: the last run ended because rank 0 (pid" in errs[0] and "code 75" in errs[0]
    assert (out / "met-a1").read_text() == "1"  # the second runs met each other


@once
def test_a_restart_on_node_0_waits_for_the_master_port_to_be_free():
    from keras_strategies.launch.restarts import wait_for_port

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        start = time.monotonic()
        assert not wait_for_port(f"127.0.0.1:{port}", 0.3)  # bounded
        assert time.monotonic() - start >= 0.3
        threading.Timer(0.4, busy.close).start()
        assert wait_for_port(f"127.0.0.1:{port}", 10)
        assert 0.35 < time.monotonic() - start - 0.3 < 5
    finally:
        busy.close()


@pytest.mark.parametrize("max_restarts, grace, fragment", [
    (-1, None, "--max-restarts must be an integer >= 0"),
    (1.5, None, "--max-restarts must be an integer >= 0"),
    (1, "soon", "KERAS_STRATEGIES_TERM_GRACE='soon' must be a number of seconds >= 0"),
    (1, "-5", "KERAS_STRATEGIES_TERM_GRACE='-5' must be a number of seconds >= 0"),
])
def test_bad_restart_options_are_clear_errors_listed_on_the_errors_page(monkeypatch, max_restarts, grace, fragment):
    if grace is not None:
        monkeypatch.setenv("KERAS_STRATEGIES_TERM_GRACE", grace)
    with pytest.raises(LaunchError) as info:  # before any process starts
        launch_with_restarts(["/nonexistent/python", "train.py"], max_restarts=max_restarts)
    assert fragment in str(info.value)
    if max_restarts == -1 or grace == "soon":  # the cases the errors page shows
        page = " ".join((Path(__file__).parent.parent / "docs" / "launching" / "errors.md").read_text().split())
        assert str(info.value) in page


def test_the_cli_reports_a_bad_max_restarts(capsys):
    assert main(["--max-restarts", "-1", "train.py"]) == 2
    assert "--max-restarts must be an integer >= 0" in capsys.readouterr().err
