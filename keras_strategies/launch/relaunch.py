"""Starting a plain `python train.py` again as several local ranks."""

import os
import sys

from keras_strategies.errors import unsupported
from keras_strategies.launch.job import say
from keras_strategies.launch.ranks import launch


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
    say(f"{strategy_name}: starting {nproc_per_node} processes, one per device")
    sys.exit(launch([sys.executable, *argv[1:]], nproc_per_node=nproc_per_node))
