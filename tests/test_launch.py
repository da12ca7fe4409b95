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
    assert len(ports) == 1 and int(ports.pop()) > 0


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
    def send_sigterm_when_ready():
        for rank in (0, 1):
            wait_for_file(tmp_path / f"rank{rank}.pid")
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's handler is installed

    sender = threading.Thread(target=send_sigterm_when_ready, daemon=True)
    sender.start()
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
