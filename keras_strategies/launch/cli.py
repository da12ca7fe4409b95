"""The command line: `keras-strategies launch ...` and `python -m keras_strategies.launch ...`."""

import argparse
import sys

from keras_strategies.cluster import ClusterError
from keras_strategies.launch.ranks import RENDEZVOUS_TIMEOUT
from keras_strategies.launch.restarts import launch_with_restarts


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
    parser.add_argument("--num-ps", "--num_ps", type=int, default=0, metavar="N",
                        help="ParameterServer: the last N processes of the job are parameter servers "
                        "(rank 0 is the chief, the others workers)")
    parser.add_argument("--rendezvous-timeout", "--rdzv-timeout", type=float, default=RENDEZVOUS_TIMEOUT,
                        metavar="SECONDS", help="with --nnodes > 1: how long the machines' launchers have to "
                        f"meet before every one fails naming the missing machine (default {RENDEZVOUS_TIMEOUT:g})")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop every rank and exit 124 after this many seconds")
    parser.add_argument("--max-restarts", "--max_restarts", type=int, default=0, metavar="N",
                        help="when a rank fails, hangs or is preempted, stop every rank of this machine "
                        "and start them all again, up to N times (default 0)")
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
        return launch_with_restarts(
            runner + [args.script] + list(args.script_args),
            max_restarts=args.max_restarts,
            nproc_per_node=args.nproc_per_node,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            master=args.master,
            timeout=args.timeout,
            prefix_output=not args.no_prefix,
            num_ps=args.num_ps,
            rendezvous_timeout=args.rendezvous_timeout,
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
