"""Runs the whole suite once per backend, each backend in its own processes.

    python tests/run_all.py                 # tensorflow, jax and torch
    python tests/run_all.py jax -- -k fit   # one backend, extra pytest args
    python tests/run_all.py --jobs 1        # nothing side by side

Two kinds of tests. The multi-process ones (real jobs, timeouts, launched
examples; every test not marked `in_process`) run at normal priority, one
backend's at a time while the in-process ones run. The tests marked
`in_process` (they run in pytest's own process and time nothing) fill the
time those jobs leave a core idle (waits for a hung peer's timeout,
rendezvous, one process importing while its peer waits): from the start,
two of their pytest processes side by side (`--jobs`; 2 by default, 1 on a
one-core machine), in Linux's idle scheduling class (`lowest_priority`), so
that they run on what the multi-process jobs leave (at nice 19 instead,
TensorFlow's multi-process tests took 1 001 s against 842 s beside them in
the idle class, 2026-12-03). The longest first:
TensorFlow's, split in two processes (`SPLIT`: tests/test_features.py, then
the rest), then JAX's and torch's. Once every in-process test has ended,
`--jobs` backends' multi-process tests run side by side: alone, JAX's and
torch's left the two cores 35-50% idle (sampled every 10 s, 2026-12-04).
Measured on 2 cores, the whole suite, the same 1 100 tests: 1 965 s with
the multi-process tests one backend at a time (TensorFlow 909 s, JAX 569 s,
torch 488 s), 1 545 s this way (every in-process test ended during
TensorFlow's 784 s; JAX's 780 s began beside its end, torch's 690 s beside
JAX's). Two backends' multi-process tests side by side from the start gained
nothing in an earlier measurement (TensorFlow's and JAX's together 1 947 s,
against 1 063 + 867 s one after the other): the in-process tests need that
idle time first.
Output: the multi-process tests of the one backend running alone are
printed as they come; every other pytest process's output is printed whole
when it ends. With `--jobs 1` the in-process tests run first, then the
others, one backend at a time, nothing side by side.

Each pytest process's closing line gives its wall-clock seconds and its CPU
seconds (its own and those of the jobs it started): the in-process groups, in
the idle class, take long on the clock and little CPU; with both cores busy
throughout, the suite's length follows the CPU. Exits non-zero when any
backend has a failure or runs no test, and ends with one closing line adding
up every backend.
"""

import collections
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


def lowest_priority(pid):
    """Linux's idle scheduling class for process `pid` (it runs only when no
    other process wants the core, and gives way at once when one wakes), else
    nice 19; what it starts inherits it. Nothing where neither exists."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    except (AttributeError, OSError):  # no such call here, or the process already ended
        pass


def wait_with_cpu(process):
    """Waits for `process` (a `subprocess.Popen`); returns `(exit code, CPU
    seconds)`: the user and system time of the process and of every
    descendant it waited for (Linux's `wait4`; None where there is none).
    On 2 cores the suite keeps both busy from start to end (idle 2% on
    average in 10 s samples, 2026-12-05), so its length follows the CPU its
    groups take."""
    if not hasattr(os, "wait4"):
        return process.wait(), None
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime


Outcome = collections.namedtuple("Outcome", "code counts seconds output cpu")
"""One pytest process's result: exit code, counts per word in `WORDS`, wall
seconds, its whole output, and CPU seconds (`None` where `wait4` is missing)."""


def run(root, backend, marker, extra, echo, cache, paths=("tests",), lowest=False):
    """One pytest process over the tests `marker` selects in `paths` (each
    relative to `root`, or a pytest option such as `--ignore=...`); returns
    its `Outcome` and prints the output as it comes
    when `echo`. JAX programs are compiled once into `cache`. `lowest`: at the
    lowest CPU priority (`lowest_priority`)."""
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
    if lowest:
        lowest_priority(process.pid)
    for line in process.stdout:
        lines.append(line)
        if echo:
            sys.stdout.write(line)
        if re.search(r"\d+ (passed|failed|error|deselected)", line):
            last = line
    code, cpu = wait_with_cpu(process)
    shutil.rmtree(basetemp, ignore_errors=True)
    counts = dict.fromkeys(WORDS, 0)
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last):
        counts["errors" if word.startswith("error") else word] += int(number)
    return Outcome(code, counts, time.time() - start, "".join(lines), cpu)


def report(backend, phase, outcome):
    cpu = "" if outcome.cpu is None else f" (CPU {outcome.cpu:.0f}s)"
    print(f"===== {backend} ({phase}): exit {outcome.code}, {outcome.seconds:.0f}s{cpu}, "
          + ", ".join(f"{outcome.counts[w]} {w}" for w in WORDS) + " =====", flush=True)


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
    side_by_side = jobs > 1
    printed = set()

    def print_finished(futures, wait=False):
        """Prints each in-process outcome once, whole (waiting for all when `wait`)."""
        done = concurrent.futures.as_completed(futures) if wait else [f for f in futures if f.done()]
        for future in done:
            if future in printed:
                continue
            printed.add(future)
            (backend, name), outcome = futures[future], future.result()
            if side_by_side:
                print(f"===== KERAS_BACKEND={backend} ({name}) =====\n{outcome.output}", end="", flush=True)
            report(backend, name, outcome)
            outcomes[backend].append(outcome)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool, \
            concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as others_pool:
        print(f"===== in_process tests, {jobs} pytest process(es) at a time"
              + (", at the lowest priority beside the others =====" if side_by_side else " ====="), flush=True)
        futures = {pool.submit(run, root, b, "in_process", extra, not side_by_side, cache, paths, side_by_side):
                   (b, name) for b, name, paths in in_process_jobs(backends)}
        if not side_by_side:
            print_finished(futures, wait=True)
        # The others: one backend at a time while in-process tests fill the
        # cores' idle time; once those have all ended, `jobs` backends side by
        # side (alone, they left the cores 35-50% idle: waits for a hung
        # peer's timeout, rendezvous, imports).
        running, queue = {}, list(backends)
        while queue or running:
            width = jobs if all(f.done() for f in futures) else 1
            while queue and len(running) < width:
                backend = queue.pop(0)
                echo = not running and (not queue or width == 1)  # never two outputs interleaved
                print(f"===== KERAS_BACKEND={backend} (the others"
                      + ("" if echo else ", printed when they end") + ") =====", flush=True)
                running[others_pool.submit(run, root, backend, "not in_process", extra, echo, cache)] = (
                    backend, echo)
            done, _ = concurrent.futures.wait(list(running), timeout=5,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                backend, echoed = running.pop(future)
                outcome = future.result()
                if not echoed:
                    print(f"===== KERAS_BACKEND={backend} (the others) =====\n{outcome.output}", end="", flush=True)
                report(backend, "the others", outcome)
                outcomes[backend].append(outcome)
            print_finished(futures)
        print_finished(futures, wait=True)
    shutil.rmtree(cache, ignore_errors=True)
    ok, totals = True, dict.fromkeys(WORDS, 0)
    for backend, results in outcomes.items():
        passed = sum(result.counts["passed"] for result in results)
        if passed == 0 or any(result.code not in (0, NO_TESTS_COLLECTED) for result in results):
            ok = False
            print(f"===== {backend}: FAILED (or ran no test) =====")
        for result in results:
            for word in WORDS:
                totals[word] += result.counts[word]
    cpus = [result.cpu for results in outcomes.values() for result in results]
    print(f"all backends: {totals['passed']} passed, {totals['failed'] + totals['errors']} failed, "
          f"{totals['skipped']} skipped in {time.time() - start:.0f}s"
          + ("" if None in cpus else f" (CPU {sum(cpus):.0f}s)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
