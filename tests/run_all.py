"""Runs the whole suite once per backend, each in its own process.

    python tests/run_all.py                 # tensorflow, jax and torch
    python tests/run_all.py jax -- -k fit   # one backend, extra pytest args

Exits non-zero when any backend has a failure or runs no test, and ends with
one closing line adding up every backend.
"""

import os
import re
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")


def main(argv):
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    backends = argv or list(BACKENDS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    ok = True
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1")
        env.pop("XLA_FLAGS", None)
        start = time.time()
        print(f"===== KERAS_BACKEND={backend} =====", flush=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10",
             os.path.join(root, "tests"), *extra],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        last = ""
        for line in process.stdout:
            sys.stdout.write(line)
            if re.search(r"\d+ (passed|failed|error)", line):
                last = line
        code = process.wait()
        counts = {key: 0 for key in totals}
        for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last):
            counts["errors" if word.startswith("error") else word] += int(number)
        for key in totals:
            totals[key] += counts[key]
        print(f"===== {backend}: exit {code}, {time.time() - start:.0f}s =====", flush=True)
        if code != 0 or counts["passed"] == 0:
            ok = False
    failed = totals["failed"] + totals["errors"]
    print(f"all backends: {totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
