"""`keras-strategies launch`: start the ranks of a multi-process job on this machine.

```bash
keras-strategies launch --nproc-per-node 2 train.py --epochs 3
python -m keras_strategies.launch --nproc-per-node 2 train.py --epochs 3
# several machines: the same command on each, with its --node-rank
keras-strategies launch --nnodes 2 --node-rank 0 --master 10.0.0.1:29500 \\
    --nproc-per-node 2 train.py
```

Each rank gets torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`), so
`keras_strategies.cluster.resolve_cluster()` (and torch itself) reads them on
any backend, plus `KERAS_STRATEGIES_LAUNCHED=1`. The machine's cores are
divided among the local ranks (see `rank_thread_settings`). Every output line
is prefixed with `[rank K] `. When a rank fails, the launcher stops the others
and exits with that rank's code; Ctrl-C, SIGTERM and `--timeout` stop them all.
No rank outlives the launcher, unless it is killed with SIGKILL itself or a
rank moves its own children into another session.

This module imports no backend.
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from keras_strategies.cluster import ClusterError, _split_address
from keras_strategies.ports import free_port, port_in_use

GRACE_SECONDS = 3.0  # between SIGTERM and SIGKILL when stopping ranks
TIMEOUT_EXIT_CODE = 124  # as timeout(1)
_POLL_SECONDS = 0.05
_XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
# Other cluster descriptions would take precedence over (or contradict) the
# variables the launcher sets: refuse them rather than start a confused job.
_FOREIGN_CLUSTER_VARIABLES = (
    "TF_CONFIG",
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)


class LaunchError(ClusterError):
    """The launcher was asked for something it cannot start (bad options, busy port)."""


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def rank_thread_settings(nproc_per_node, environ=None, cpu_count=None):
    """The thread variables each local rank gets: the cores divided among ranks.

    Several processes each using every core run many times slower than with
    their share (torchrun sets `OMP_NUM_THREADS=1` for the same reason), on
    every backend: TensorFlow, XLA (JAX) and torch each size their own pools.

    Args:
        nproc_per_node: the number of ranks on this machine.
        environ: the environment the ranks start from (`os.environ` when
            `None`); a variable already set there is kept as it is.
        cpu_count: the usable cores; this process's CPU affinity when `None`.

    Returns:
        A dict of the variables to add: `OMP_NUM_THREADS`, `MKL_NUM_THREADS`,
        `TF_NUM_INTRAOP_THREADS` (the share, at least 1),
        `TF_NUM_INTEROP_THREADS` (1 for a one-thread share, else 2), and for a
        one-thread share `XLA_FLAGS` with
        `--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`
        appended (unless `XLA_FLAGS` already sets either flag).

    Example:
    >>> rank_thread_settings(2, environ={}, cpu_count=2)["OMP_NUM_THREADS"]
    '1'
    """
    environ = os.environ if environ is None else environ
    cores = _cpu_count() if cpu_count is None else cpu_count
    threads = max(1, cores // max(1, nproc_per_node))
    wanted = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": "1" if threads == 1 else "2",
    }
    settings = {k: v for k, v in wanted.items() if not environ.get(k)}
    xla = environ.get("XLA_FLAGS", "")
    if threads == 1 and not any(
        flag in xla
        for flag in ("xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads")
    ):
        settings["XLA_FLAGS"] = f"{xla} {_XLA_ONE_THREAD}".strip()
    return settings


def _resolve_master(master, nnodes, node_rank):
    """`(addr, port)` of rank 0's rendezvous, checked."""
    if master is None:
        if nnodes > 1:
            raise LaunchError(
                f"--nnodes {nnodes} needs --master ADDR:PORT: the address of "
                "node 0 and a free port there, the same on every node (e.g. "
                "--master 10.0.0.1:29500)."
            )
        return "127.0.0.1", free_port("127.0.0.1")
    try:
        addr, port = _split_address(master, "--master")
    except ClusterError as error:
        raise LaunchError(str(error)) from None
    if node_rank == 0 and port_in_use(addr, port):
        raise LaunchError(
            f"--master {master}: port {port} is already in use on this machine "
            "(node 0, where rank 0 listens): pick a free port, or stop what "
            f"holds {port}."
        )
    return addr, port


def _check_options(command, nproc_per_node, nnodes, node_rank, timeout):
    if isinstance(command, str) or not command or not all(
        isinstance(part, str) for part in command
    ):
        raise LaunchError(
            "command must be a non-empty list of strings, the argv of each rank, "
            f"e.g. [sys.executable, 'train.py']; got {command!r}."
        )
    for name, value in (("nproc_per_node", nproc_per_node), ("nnodes", nnodes)):
        if not isinstance(value, int) or value < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be an integer >= 1; got {value!r}.")
    if not isinstance(node_rank, int) or not 0 <= node_rank < nnodes:
        raise LaunchError(
            f"--node-rank must be 0..{nnodes - 1} with --nnodes {nnodes}; got {node_rank!r}."
        )
    if timeout is not None and not timeout > 0:
        raise LaunchError(f"--timeout must be a positive number of seconds; got {timeout!r}.")


def launch(
    command,
    nproc_per_node=1,
    nnodes=1,
    node_rank=0,
    master=None,
    env=None,
    timeout=None,
    prefix_output=True,
):
    """Starts this machine's ranks of a job and waits for them.

    Args:
        command: the full argv of each rank, e.g.
            `[sys.executable, "train.py", "--epochs", "3"]`.
        nproc_per_node: ranks to start on this machine.
        nnodes: machines in the job (each runs this launcher).
        node_rank: this machine's index, `0..nnodes - 1`; node 0 hosts rank 0.
        master: `"ADDR:PORT"` of rank 0's rendezvous. Required when
            `nnodes > 1`; with one node, `None` picks a free port on
            127.0.0.1. On node 0 a port already in use is an error.
        env: variables to add to (or override in) `os.environ` for the ranks.
            It must not set TF_CONFIG or KERAS_DISTRIBUTION_*: the launcher
            describes the cluster itself.
        timeout: seconds after which every rank is stopped and the launcher
            returns 124; `None` waits for ever.
        prefix_output: prefix each line of each rank's stdout and stderr with
            `[rank K] `; `False` lets the ranks write to the launcher's own
            streams.

    Returns:
        The exit code the CLI exits with: 0 when every rank exits 0; else the
        first failed rank's code (128 + N for a rank killed by signal N);
        124 on timeout; 130, 143 or 129 when the launcher got SIGINT, SIGTERM
        or SIGHUP.

    Raises:
        LaunchError: bad options, a busy `--master` port, or a rank that
            cannot be started.

    Example:
    ```python
    import sys
    from keras_strategies.launch import launch
    code = launch([sys.executable, "train.py", "--epochs", "3"], nproc_per_node=2)
    ```
    """
    command = list(command) if isinstance(command, (list, tuple)) else command
    _check_options(command, nproc_per_node, nnodes, node_rank, timeout)
    base = dict(os.environ)
    base.update({str(k): str(v) for k, v in (env or {}).items()})
    foreign = [name for name in _FOREIGN_CLUSTER_VARIABLES if base.get(name)]
    if foreign:
        raise LaunchError(
            f"{', '.join(foreign)} is set: it would override the ranks' RANK/"
            "WORLD_SIZE set by the launcher. Unset it, or start the job "
            "without the launcher."
        )
    addr, port = _resolve_master(master, nnodes, node_rank)
    base.update(rank_thread_settings(nproc_per_node, base))
    base.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the prefixer live
    world_size = nnodes * nproc_per_node
    environments = []
    for local_rank in range(nproc_per_node):
        rank_env = dict(base)
        rank_env.update(
            RANK=str(node_rank * nproc_per_node + local_rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(local_rank),
            LOCAL_WORLD_SIZE=str(nproc_per_node),
            GROUP_RANK=str(node_rank),
            MASTER_ADDR=addr,
            MASTER_PORT=str(port),
            KERAS_STRATEGIES_LAUNCHED="1",
        )
        environments.append(rank_env)
    return _Job(command, environments, prefix_output).run(timeout)


def _say(message):
    sys.stderr.write(f"keras-strategies launch: {message}\n")
    sys.stderr.flush()


def _describe_exit(code):
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}", 128 - code
    return f"exited with code {code}", code


class _Job:
    """The ranks of this machine: start, watch, stop, reap."""

    def __init__(self, command, environments, prefix_output):
        self.command = command
        self.environments = environments
        self.prefix_output = prefix_output
        self.ranks = [int(e["RANK"]) for e in environments]
        self.procs = []
        self.readers = []
        self.write_lock = threading.Lock()
        self.signals = []  # signal numbers received, in order

    def run(self, timeout):
        previous = self._install_handlers()
        try:
            self._start()
            return self._watch(timeout)
        finally:
            try:
                self._stop()
            finally:
                self._restore_handlers(previous)

    # -- signals: the handler only records; the loops act on it.

    def _on_signal(self, signum, frame):
        self.signals.append(signum)

    def _install_handlers(self):
        previous = {}
        if threading.current_thread() is not threading.main_thread():
            return previous
        for name in _STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                previous[number] = signal.signal(number, self._on_signal)
        return previous

    def _restore_handlers(self, previous):
        for number, handler in previous.items():
            signal.signal(number, handler)

    # -- start and watch.

    def _start(self):
        pipe = subprocess.PIPE if self.prefix_output else None
        for rank, environment in zip(self.ranks, self.environments):
            if self.signals:
                return
            try:
                proc = subprocess.Popen(
                    self.command,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=pipe,
                    stderr=pipe,
                    start_new_session=True,  # its own process group, to stop it whole
                )
            except OSError as error:
                raise LaunchError(
                    f"cannot start rank {rank} with {self.command!r}: {error}."
                ) from None
            self.procs.append(proc)
            if self.prefix_output:
                for stream, target in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                    reader = threading.Thread(
                        target=self._copy_lines,
                        args=(stream, target, f"[rank {rank}] "),
                        daemon=True,
                    )
                    reader.start()
                    self.readers.append(reader)

    def _copy_lines(self, stream, target, prefix):
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                if not line.endswith("\n"):
                    line += "\n"
                with self.write_lock:
                    out = getattr(sys, target)
                    out.write(prefix + line)
                    out.flush()

    def _watch(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.signals:
                signum = self.signals[0]
                _say(f"got {signal.Signals(signum).name}; stopping all ranks.")
                return 128 + signum
            codes = [proc.poll() for proc in self.procs]
            for rank, proc, code in zip(self.ranks, self.procs, codes):
                if code not in (None, 0):
                    what, exit_code = _describe_exit(code)
                    _say(
                        f"rank {rank} (pid {proc.pid}) {what}; stopping the other "
                        "ranks. Its last output is above, prefixed with "
                        f"[rank {rank}]."
                    )
                    return exit_code
            if len(self.procs) == len(self.ranks) and all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() >= deadline:
                _say(
                    f"timed out after {timeout:g} s (--timeout); stopping all "
                    f"ranks and exiting with {TIMEOUT_EXIT_CODE}."
                )
                return TIMEOUT_EXIT_CODE
            time.sleep(_POLL_SECONDS)

    # -- stop: SIGTERM to every rank's process group, SIGKILL after a grace.

    def _group_alive(self, proc):
        proc.poll()  # reap the leader first: a zombie still counts as a member
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _signal_groups(self, signum):
        for proc in self.procs:
            if proc.poll() is None or self._group_alive(proc):
                try:
                    os.killpg(proc.pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass

    def _stop(self):
        self._signal_groups(signal.SIGTERM)
        stop_by = time.monotonic() + GRACE_SECONDS
        signals_before = len(self.signals)
        while any(self._group_alive(p) for p in self.procs):
            # A further Ctrl-C while stopping skips the grace period.
            if time.monotonic() >= stop_by or len(self.signals) > signals_before:
                break
            time.sleep(_POLL_SECONDS)
        self._signal_groups(signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # unkillable (D state): report it
                _say(f"rank process {proc.pid} did not exit after SIGKILL.")
        for reader in self.readers:
            reader.join(timeout=2)


def _parser(prog):
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Start the ranks of a multi-process Keras job on this machine, with "
            "torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
            "MASTER_PORT...) set for each."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1,
                        help="ranks on this machine (default 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="machines in the job (default 1)")
    parser.add_argument("--node-rank", "--node_rank", type=int, default=0,
                        help="this machine's index, 0..nnodes-1 (default 0)")
    parser.add_argument("--master", metavar="ADDR:PORT", default=None,
                        help="rank 0's rendezvous address; required with --nnodes > 1; "
                        "default 127.0.0.1 and a free port")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop every rank and exit 124 after this many seconds")
    parser.add_argument("-m", "--module", action="store_true",
                        help="run script as a module (python -m script)")
    parser.add_argument("--no-prefix", action="store_true",
                        help="do not prefix output lines with [rank K]")
    parser.add_argument("script", help="the training script (or module with -m)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER,
                        help="arguments passed to the script")
    return parser


def main(argv=None, prog="python -m keras_strategies.launch"):
    """Runs the launcher from command-line arguments.

    Args:
        argv: the options and script, e.g.
            `["--nproc-per-node", "2", "train.py", "--epochs", "3"]`;
            `sys.argv[1:]` when `None`.
        prog: the program name shown in usage and error messages.

    Returns:
        The exit code (see `launch`); 2 for bad options.

    Example:
    ```python
    raise SystemExit(main(["--nproc-per-node", "2", "train.py"]))
    ```
    """
    args = _parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    runner = [sys.executable, "-m"] if args.module else [sys.executable]
    try:
        return launch(
            runner + [args.script] + list(args.script_args),
            nproc_per_node=args.nproc_per_node,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            master=args.master,
            timeout=args.timeout,
            prefix_output=not args.no_prefix,
        )
    except ClusterError as error:
        sys.stderr.write(f"{prog}: error: {error}\n")
        return 2


_CLI_USAGE = "usage: keras-strategies launch [options] script.py [script args...]\n"


def cli(argv=None):
    """The `keras-strategies` console script: `keras-strategies launch ...`.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when `None`.

    Returns:
        The exit code (see `launch`).

    Example:
    ```bash
    keras-strategies launch --nproc-per-node 2 train.py --epochs 3
    ```
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(_CLI_USAGE + "Run `keras-strategies launch --help` for the options.\n")
        return 0
    if not argv or argv[0] != "launch":
        sys.stderr.write(
            _CLI_USAGE + "keras-strategies: error: the only command is `launch`; "
            f"got {argv[0] if argv else 'nothing'!r}.\n"
        )
        return 2
    return main(argv[1:], prog="keras-strategies launch")


if __name__ == "__main__":
    sys.exit(main())


def relaunch_this_script(nproc_per_node, strategy_name, backend):
    """Runs the current program again as `nproc_per_node` local ranks, waits
    for them, and exits with their code (it does not return).

    This is how a one-process-per-device strategy (Mirrored on PyTorch)
    started as a plain `python train.py` gets its other processes, as
    Lightning does: every rank runs the script from the start, with the
    launcher's variables set, and builds its own strategy.

    Args:
        nproc_per_node: how many ranks to start.
        strategy_name: used in the error for programs that cannot be re-run.
        backend: used in that error too.
    """
    from keras_strategies.errors import unsupported

    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    script = sys.argv[0] if sys.argv else ""
    if "-c" in argv[1:2] or not script or script == "-" or "ipykernel" in script or not (
        os.path.exists(script) or "-m" in argv
    ):
        raise unsupported(
            strategy_name,
            backend,
            f"{nproc_per_node} devices need {nproc_per_node} processes, and this "
            "program (a notebook, `python -c` or an interactive session) cannot be "
            "started again as several processes",
            "Put the training in a script and run `keras-strategies launch "
            f"--nproc-per-node {nproc_per_node} train.py`, or use one device here.",
        )
    _say(f"{strategy_name}: starting {nproc_per_node} processes, one per device")
    sys.exit(launch([sys.executable, *argv[1:]], nproc_per_node=nproc_per_node))
