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
and exits with that rank's code, or with `--max-restarts N` starts them all
again up to N times (`launch_with_restarts`); Ctrl-C and SIGTERM are
forwarded to the ranks as SIGTERM, with `KERAS_STRATEGIES_TERM_GRACE` seconds
(default 60) to save and exit; `--timeout` stops them all.
No rank outlives the launcher, unless it is killed with SIGKILL itself or a
rank moves its own children into another session.

The package's rooms: `ranks` (each rank's environment, `launch()`), `job`
(supervising the processes), `restarts` (`--max-restarts`), `cli` (the command
line), `relaunch` (a plain script started again as several ranks), `ports`
(free and busy ports). It imports no backend.
"""

from keras_strategies.launch.cli import cli, main
from keras_strategies.errors import LaunchError
from keras_strategies.launch.ranks import launch, rank_thread_settings
from keras_strategies.launch.relaunch import relaunch_this_script
from keras_strategies.launch.restarts import launch_with_restarts

__all__ = ["LaunchError", "cli", "launch", "launch_with_restarts", "main", "rank_thread_settings",
           "relaunch_this_script"]
