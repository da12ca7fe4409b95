"""One gain, measured before and after in turns: `benchmarks/run.py` from an
earlier commit of this repository and from the working tree, alternating.

The earlier commit is checked out in a temporary git worktree and imported
from there (`PYTHONPATH`); the working tree is imported as installed. Each
turn is one `run.py` round of ours (`--methods ks`); the order alternates
(before after, after before, ...) so a drift of the machine's speed favours
neither.

Example:

    python benchmarks/before_after.py --before 5f0479b --rounds 4 --out before-after.txt -- \\
        --backends jax --strategies mirrored --workloads bn_convnet --replicas 2 --steps 20 --optimizer adamw

Prints each turn's samples/s (median of its epochs, the first left out) and,
at the end, both medians and after / before.
"""

import argparse
import contextlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def worktree(revision):
    """A temporary checkout of `revision`, importable as `keras_strategies`."""
    with tempfile.TemporaryDirectory(prefix="ks-before-") as parent:
        path = pathlib.Path(parent) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), revision],
                       check=True, timeout=120)
        try:
            # the installed package maps keras_strategies.backends onto backends/ (pyproject.toml)
            (path / "keras_strategies" / "backends").symlink_to("../backends")
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], timeout=120)


def tree_env(tree):
    """The environment in which `tree`'s code is the one imported."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH", "")]))
    return env


def check_imports(tree):
    """Refuses to measure when the package or its backends would come from elsewhere than `tree` (an installed copy
    of this repository maps `keras_strategies.backends` on its own backends/)."""
    probe = ("import keras_strategies, keras_strategies.backends as b; "
             "print(keras_strategies.__file__); print(list(b.__path__)[0])")
    found = subprocess.run([sys.executable, "-c", probe], cwd=str(tree), env=tree_env(tree), capture_output=True,
                           text=True, timeout=120)
    paths = found.stdout.split()
    inside = [os.path.realpath(p).startswith(os.path.realpath(tree) + os.sep) for p in paths]
    if found.returncode != 0 or len(paths) != 2 or not all(inside):
        raise SystemExit(f"the tree of --before does not import its own code: {found.stdout}{found.stderr}")


def one_round(tree, run_args, out, timeout):
    """samples/s of one `run.py` round of ours run from `tree` (None: the working tree)."""
    env = dict(os.environ) if tree is None else tree_env(tree)
    command = [sys.executable, str((tree or ROOT) / "benchmarks" / "run.py"), *run_args,
               "--methods", "ks", "--repeats", "1", "--no-plot", "--out", str(out)]
    subprocess.run(command, cwd=str(tree or ROOT), env=env, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL)
    results = json.loads(out.read_text())["runs"]
    rates = [rate for run in results if run["status"] == "ok" for rate in run["samples_per_s"]]
    if not rates:
        raise SystemExit(f"no result from {'before' if tree else 'after'}: {results}")
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit before the change (any git revision)")
    parser.add_argument("--rounds", type=int, default=4, help="turns of each (default 4)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one run.py call")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then run.py's arguments (one case)")
    args = parser.parse_args()
    run_args = [a for a in args.run_args if a != "--"]
    lines = [f"Run {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} on {platform.processor() or platform.machine()}"
             f" ({os.cpu_count()} cores); before = {args.before}, after = the working tree at "
             + subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip(),
             f"Command: python benchmarks/before_after.py --before {args.before} --rounds {args.rounds} -- "
             + " ".join(run_args), ""]
    print("\n".join(lines), flush=True)
    rates = {"before": [], "after": []}
    with worktree(args.before) as tree, tempfile.TemporaryDirectory() as scratch:
        check_imports(tree)
        for turn in range(args.rounds):
            order = ("before", "after") if turn % 2 == 0 else ("after", "before")
            for which in order:
                rate = one_round(tree if which == "before" else None, run_args,
                                 pathlib.Path(scratch) / f"{which}-{turn}.json", args.timeout)
                rates[which].append(rate)
                line = f"turn {turn} {which:6s} {rate:9.0f} samples/s"
                lines.append(line)
                print(line, flush=True)
    before, after = statistics.median(rates["before"]), statistics.median(rates["after"])
    summary = (f"\nmedian before {before:.0f}, after {after:.0f} samples/s: after / before {after / before:.2f} "
               f"(turns: before {min(rates['before']):.0f}-{max(rates['before']):.0f}, "
               f"after {min(rates['after']):.0f}-{max(rates['after']):.0f})")
    lines.append(summary)
    print(summary)
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
