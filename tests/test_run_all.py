"""tests/run_all.py's own parts."""

import os
import subprocess
import sys

import pytest

from run_all import wait_with_cpu

BURN = "import time\nstart = time.process_time()\nwhile time.process_time() - start < 0.5:\n    pass\n"


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="no wait4 here: run_all reports no CPU time")
def test_a_groups_cpu_time_counts_the_processes_it_started_and_its_exit_code_is_kept():
    """run_all reports each pytest process's CPU seconds with those of the
    jobs it started (most of a multi-process test's CPU is theirs)."""
    starts_one = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN!r}], check=True)\n{BURN}"
    code, cpu = wait_with_cpu(subprocess.Popen([sys.executable, "-c", starts_one]))
    assert code == 0 and cpu >= 1.0, cpu  # 0.5 s its own, 0.5 s its child's
    code, cpu = wait_with_cpu(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))
    assert code == 3 and cpu < 1.0, (code, cpu)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    process.kill()
    assert wait_with_cpu(process)[0] == -9
