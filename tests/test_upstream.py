"""The upstream bug reproductions under docs/upstream/ still show their bug.

Each page there (but index.md) reproduces one Keras or engine bug that a patch
of this package works around, with one ```python block that uses plain Keras
and the engine only. The block's first line says how to run it
(`# KERAS_BACKEND=tensorflow python repro.py`): the variables before `python`
are its environment, `KERAS_BACKEND` its backend. The page's lines
`<!-- shows: TEXT -->` say what the output contains while the bug is there,
and every such TEXT is also in the block (its expected output, in comments).

Here each block runs in a subprocess, in its backend's run of the suite, with
a timeout, and its output must hold every TEXT. When a Keras release fixes the
bug, its check fails: the patch named on the page can then go.

Blocks of one backend and environment share one process, each in a fresh
namespace, run from a file (AutoGraph reads the source). TensorFlow is
imported once, so the runner lets a block's repeated request for the same
logical CPUs through (only the first call can set them), and hands every
block asking for a MirroredStrategy over the same devices the same one (a
second one in the process collides with the first's collective instance
keys). A page with `<!-- test: own process -->`
runs alone (the ParameterServer page: its in-process cluster changes the
process for good).
"""

import functools
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

from conftest import BACKEND
from keras_strategies.patches import PATCHES

ROOT = pathlib.Path(__file__).resolve().parent.parent
UPSTREAM = ROOT / "docs" / "upstream"
FENCE = re.compile(r"^```python[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SHOWS = re.compile(r"^<!-- shows: (?P<text>.+?) -->$", re.MULTILINE)
OWN_PROCESS = "<!-- test: own process -->"
TIMEOUT = {"shared": 150, "own": 90}  # seconds; the shared TensorFlow process takes ~20 s here

RUNNER = """
import runpy, sys, traceback
blocks = {blocks!r}
if len(blocks) > 1 and {backend!r} == "tensorflow":
    import tensorflow as tf
    _configure = tf.config.set_logical_device_configuration

    def configure(device, logical_devices):
        present = tf.config.get_logical_device_configuration(device)
        if present is not None and len(present) == len(logical_devices):
            return  # a later block asking for what the first one set
        _configure(device, logical_devices)

    tf.config.set_logical_device_configuration = configure

    class MirroredStrategy(tf.distribute.MirroredStrategy):
        # One per device list: a second MirroredStrategy over the same devices
        # in one process collides with the first one's collective instance keys.
        made = {{}}

        def __new__(cls, devices=None, cross_device_ops=None):
            key = (tuple(devices or ()), cross_device_ops)
            if key not in cls.made:
                cls.made[key] = super().__new__(cls)
                cls.made[key].ready = False
            return cls.made[key]

        def __init__(self, devices=None, cross_device_ops=None):
            if not self.ready:
                super().__init__(devices, cross_device_ops)
                self.ready = True

    tf.distribute.MirroredStrategy = MirroredStrategy
for name, path in blocks:
    print(f"=== BEGIN {{name}} ===", flush=True)
    try:
        runpy.run_path(path, run_name="__main__")  # from a file: AutoGraph reads the source
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush(); sys.stderr.flush()
    print(f"=== END {{name}} ===", flush=True)
"""


def upstream_pages():
    return sorted(p for p in UPSTREAM.glob("*.md") if p.name != "index.md")


def parse(page):
    """`(code, environment, markers, own_process)` of a reproduction page."""
    text = page.read_text()
    blocks = FENCE.findall(text)
    assert len(blocks) == 1, f"{page.name}: one ```python block, found {len(blocks)}"
    code = blocks[0]
    first = code.splitlines()[0]
    assert first.startswith("# ") and " python " in f"{first} ", f"{page.name}: first line {first!r}"
    words = shlex.split(first[2:].split(" python", 1)[0])
    environment = dict(word.split("=", 1) for word in words)
    assert "KERAS_BACKEND" in environment, f"{page.name}: the first line names no KERAS_BACKEND"
    markers = SHOWS.findall(text)
    return code, environment, markers, OWN_PROCESS in text


def pages_here():
    return [p for p in upstream_pages() if parse(p)[1]["KERAS_BACKEND"] == BACKEND]


def _group(page):
    code, environment, _, own = parse(page)
    return page.name if own else tuple(sorted(environment.items()))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """`run(group)`: the output of each page of a group, run once per module."""
    directory = tmp_path_factory.mktemp("upstream")
    return functools.lru_cache(maxsize=None)(lambda group: run_group(group, directory))


def run_group(group, directory):
    """Runs the blocks of one group in one subprocess; `{page name: its output}`."""
    pages = [p for p in pages_here() if _group(p) == group]
    _, environment, _, own = parse(pages[0])
    blocks = []
    for page in pages:
        path = directory / f"{page.stem}.py"
        path.write_text(parse(page)[0])
        blocks.append((page.name, str(path)))
    script = RUNNER.format(blocks=blocks, backend=environment["KERAS_BACKEND"])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KERAS_STRATEGIES_", "KERAS_DISTRIBUTION_", "TF_CONFIG", "XLA_FLAGS"))}
    env.update(environment, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="1")
    start = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=directory, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT["own" if own else "shared"])
    except subprocess.TimeoutExpired as error:  # subprocess.run has killed it
        pytest.fail(f"{[p.name for p in pages]} ran past {error.timeout} s:\n{(error.output or '')[-4000:]}")
    output = result.stdout
    print(f"{[p.name for p in pages]}: {time.monotonic() - start:.1f} s")
    segments = {}
    for page in pages:
        match = re.search(rf"=== BEGIN {re.escape(page.name)} ===\n(.*?)=== END {re.escape(page.name)} ===",
                          output, re.DOTALL)
        assert match, f"{page.name} did not run to its end:\n{output[-4000:]}"
        segments[page.name] = match.group(1)
    return segments


@pytest.mark.parametrize("page", pages_here(), ids=lambda p: p.stem)
def test_the_reproduction_still_shows_its_bug(page, outputs):
    _, _, markers, _ = parse(page)
    output = outputs(_group(page))[page.name]
    missing = [m for m in markers if m not in output]
    assert not missing, (f"{page.name} no longer shows {missing}: has Keras (or the engine) fixed it? Then drop "
                         f"the page and its patch. Its output:\n{output[-4000:]}")


def test_every_page_is_well_formed():
    pages = upstream_pages()
    assert len(pages) >= 8, pages
    for page in pages:
        code, environment, markers, _ = parse(page)
        assert markers, f"{page.name} says nothing it shows (<!-- shows: ... -->)"
        assert "keras_strategies" not in code, f"{page.name}: the reproduction must use plain Keras"
        assert [m for m in markers if m not in code] == [], f"{page.name}: the block's comments show every marker"
        assert environment["KERAS_BACKEND"] in ("tensorflow", "jax", "torch"), page.name


def test_the_index_and_the_navigation_list_every_page():
    index = (UPSTREAM / "index.md").read_text()
    nav = (ROOT / "mkdocs.yml").read_text()
    names = [p.name for p in upstream_pages()]
    assert [n for n in names if f"]({n})" not in index] == []
    assert [n for n in ["index.md", *names] if f" upstream/{n}" not in nav] == []


def test_the_index_classifies_every_patch():
    """Every patch is in the index: in the table (a bug) or in the list of
    design patches under it, so a new patch has to be sorted into one."""
    index = (UPSTREAM / "index.md").read_text()
    assert [p.name for p in PATCHES if f"`{p.name}`" not in index] == []
    cited = set(re.findall(r"`([a-z0-9]+(?:-[a-z0-9]+)+)`", index))
    assert cited - {p.name for p in PATCHES} == set(), "the index names a patch that does not exist"
