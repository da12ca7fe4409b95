"""Runs the whole suite once per backend, each backend in its own processes.

    python tests/run_all.py                 # tensorflow, jax and torch
    python tests/run_all.py jax -- -k fit   # one backend, extra pytest args
    python tests/run_all.py --jobs 1        # nothing side by side

Two phases. First the tests marked `in_process` (they run in pytest's own
process and time nothing), two pytest processes side by side (`--jobs`; 2 by
default, 1 on a one-core machine), TensorFlow's first. TensorFlow's are split in
two processes (`SPLIT`: tests/test_features.py, then the rest), which the
other backends' then fill in beside: one TensorFlow process beside JAX's and
then torch's left one core idle for minutes. Measured on 2 cores, the same
tests: 523 s with TensorFlow in one process (71% of both cores busy), 418 s
split (86%). Then every other test (real multi-process jobs, timeouts, launched
examples), one backend at a time, with the machine to itself: side by side
they gained nothing (measured on 2 cores: TensorFlow's and JAX's together
1947 s, against 1063 + 867 s one after the other; their workers, one core
each, wait on each other's collectives when they share the cores). The
output of a side-by-side run is printed whole when it ends.

Exits non-zero when any backend has a failure or runs no test, and ends with
one closing line adding up every backend.
"""

import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

BACKENDS = ("tensorflow", "jax", "torch")
WORDS = ("passed", "failed", "errors", "skipped")
# TensorFlow's in-process tests take as long as JAX's and torch's together,
# half of it in this file (tracing tf.functions for each Keras feature case)
SPLIT = {"tensorflow": "tests/test_features.py"}
NO_TESTS_COLLECTED = 5  # pytest's exit code when the marker selects nothing (an extra -k, say)


def parse(argv):
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    jobs = min(2, os.cpu_count() or 1)
    if "--jobs" in argv:
        at = argv.index("--jobs")
        jobs = max(1, int(argv[at + 1]))
        argv = argv[:at] + argv[at + 2:]
    return argv or list(BACKENDS), jobs, extra


def jax_cache(directory):
    """Environment sharing one persistent JAX compilation cache between every
    JAX process of the run (pytest's and the jobs it starts): most of a small
    test's time on JAX is XLA compiling programs another test already
    compiled. The cache is XLA's own, keyed on the whole program; it changes
    what runs in no way, and it starts empty at every run. Its size limit
    turns on JAX's file lock (package filelock, which torch brings), for
    processes writing side by side."""
    env = {
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    if importlib.util.find_spec("filelock"):
        env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)
    return env


def run(root, backend, marker, extra, echo, cache, paths=("tests",)):
    """One pytest process over the tests `marker` selects in `paths` (each
    relative to `root`, or a pytest option such as `--ignore=...`); returns
    `(exit code, counts, seconds, output)` and prints the output as it comes
    when `echo`. JAX programs are compiled once into `cache`."""
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1", **jax_cache(cache))
    env.pop("XLA_FLAGS", None)
    basetemp = tempfile.mkdtemp(prefix=f"ks-tests-{backend}-")
    start, lines, last = time.time(), [], ""
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", "-m", marker,
         f"--basetemp={os.path.join(basetemp, 'tmp')}",
         *(path if path.startswith("-") else os.path.join(root, path) for path in paths), *extra],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for line in process.stdout:
        lines.append(line)
        if echo:
            sys.stdout.write(line)
        if re.search(r"\d+ (passed|failed|error|deselected)", line):
            last = line
    code = process.wait()
    shutil.rmtree(basetemp, ignore_errors=True)
    counts = dict.fromkeys(WORDS, 0)
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last):
        counts["errors" if word.startswith("error") else word] += int(number)
    return code, counts, time.time() - start, "".join(lines)


def report(backend, phase, outcome):
    code, counts, seconds, _ = outcome
    print(f"===== {backend} ({phase}): exit {code}, {seconds:.0f}s, "
          + ", ".join(f"{counts[w]} {w}" for w in WORDS) + " =====", flush=True)


def in_process_jobs(backends):
    """`(backend, name, paths)` of each pytest process of the in-process
    phase: first each backend in `SPLIT` (the longest) as two processes, its
    file, then the rest of its tests; then every other backend as one."""
    split = [(b, f"in_process, {SPLIT[b]}", [SPLIT[b]]) for b in backends if b in SPLIT]
    split += [(b, "in_process, the rest", ["tests", f"--ignore={SPLIT[b]}"]) for b in backends if b in SPLIT]
    return split + [(b, "in_process", ["tests"]) for b in backends if b not in SPLIT]


def main(argv):
    backends, jobs, extra = parse(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outcomes = {backend: [] for backend in backends}
    start, cache = time.time(), tempfile.mkdtemp(prefix="ks-jax-cache-")
    print(f"===== in_process tests, {jobs} pytest process(es) at a time =====", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run, root, b, "in_process", extra, jobs == 1, cache, paths): (b, name)
                   for b, name, paths in in_process_jobs(backends)}
        for future in concurrent.futures.as_completed(futures):
            (backend, name), outcome = futures[future], future.result()
            if jobs > 1:
                print(f"===== KERAS_BACKEND={backend} ({name}) =====\n{outcome[3]}", end="", flush=True)
            report(backend, name, outcome)
            outcomes[backend].append(outcome)
    for backend in backends:
        print(f"===== KERAS_BACKEND={backend} (the others, alone) =====", flush=True)
        outcome = run(root, backend, "not in_process", extra, True, cache)
        report(backend, "the others", outcome)
        outcomes[backend].append(outcome)
    shutil.rmtree(cache, ignore_errors=True)
    ok, totals = True, dict.fromkeys(WORDS, 0)
    for backend, results in outcomes.items():
        passed = sum(counts["passed"] for _, counts, _, _ in results)
        if passed == 0 or any(code not in (0, NO_TESTS_COLLECTED) for code, _, _, _ in results):
            ok = False
            print(f"===== {backend}: FAILED (or ran no test) =====")
        for _, counts, _, _ in results:
            for word in WORDS:
                totals[word] += counts[word]
    print(f"all backends: {totals['passed']} passed, {totals['failed'] + totals['errors']} failed, "
          f"{totals['skipped']} skipped in {time.time() - start:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
