"""The documentation site under docs/: its code runs as written, what it
quotes from the code and the tests is still true, and it builds strictly.

- Every ```python block of the guide pages runs, on this backend, in one
  subprocess: the blocks of a page in order, in one namespace, a fresh one per
  page. A block titled "Sketch ..." is not run (it needs hardware or a
  cluster); a block including an example (`--8<-- "examples/..."`) is run by
  test_examples.py.
- The errors page lists every cluster and launcher error: each message the
  code produces for the cases below (and test_cluster.py's) is on it, verbatim.
- Every test a page cites (`tests/test_x.py::test_name`) exists, and every
  guide is in the site's navigation.
- `mkdocs build --strict` passes (on the jax run only: it does not depend on
  the backend), and its hook names a public object without a docstring.
- The README's test command installs and runs what CI's `.ci/run` does.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import BACKEND
from test_multi_worker import CLUSTER_VARIABLES

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Not guides: a contributor's outline of new code, generated benchmark
# tables, the API reference (mkdocstrings), the build hook.
NOT_GUIDES = ("adding-a-strategy.md", "benchmarks/", "reference/", "hooks/", "upstream/")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python(?P<info>[^\n]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)


def guide_pages():
    pages = sorted(DOCS.rglob("*.md"))
    return [p for p in pages if not str(p.relative_to(DOCS)).startswith(NOT_GUIDES)]


PRINTS = re.compile(r"\s*prints\s*\n\s*```text\n(?P<output>.*?)^\s*```", re.MULTILINE | re.DOTALL)


def runnable_blocks(page):
    """`(line, code, expected)` of each block of the page that runs as written;
    `expected` is the output a "prints" block right after it shows, or `None`."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        title = re.search(r'title="([^"]*)"', match["info"])
        code = textwrap.dedent(match["code"])
        if (title and title[1].lower().startswith("sketch")) or code.lstrip().startswith("--8<--"):
            continue
        prints = PRINTS.match(text, match.end())
        expected = textwrap.dedent(prints["output"]) if prints else None
        blocks.append((text[:match.start()].count("\n") + 1, code, expected))
    return blocks


RUNNER = """
import contextlib, io, sys, traceback
pages = {pages!r}
for page, blocks in pages:
    namespace = {{"__name__": "__main__"}}
    for line, code, expected in blocks:
        where = f"{{page}}, the block at line {{line}}"
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output):
                exec(compile(code, where, "exec"), namespace)
        except BaseException:
            print(output.getvalue())
            traceback.print_exc()
            print(f"FAILED: {{where}}", flush=True)
            sys.exit(1)
        print(output.getvalue(), end="")
        if expected is not None and output.getvalue().strip() != expected.strip():
            print(f"FAILED: {{where}} printed the above, and the page says it prints:\\n{{expected}}")
            sys.exit(1)
    print(f"PAGE OK: {{page}}", flush=True)
"""


def test_every_guide_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    guides = [str(p.relative_to(DOCS)) for p in guide_pages()]
    assert len(guides) >= 15, guides
    assert [g for g in guides if f" {g}" not in nav] == []
    assert all(runnable_blocks(DOCS / name) for name in ("index.md", "choosing.md")), "the blocks are found"


def test_the_python_blocks_of_the_guides_run_as_written(tmp_path):
    pages = [(str(p.relative_to(ROOT)), runnable_blocks(p)) for p in guide_pages()]
    pages = [(name, blocks) for name, blocks in pages if blocks]
    script = tmp_path / "run_docs.py"
    script.write_text(RUNNER.format(pages=pages))
    env = {k: v for k, v in os.environ.items()  # no cluster around the blocks: they run as one process
           if k not in CLUSTER_VARIABLES and not k.startswith(("SLURM_", "KERAS_DISTRIBUTION_", "KERAS_STRATEGIES_"))}
    env.update(KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    for name, _ in pages:
        assert f"PAGE OK: {name}" in result.stdout


# Cluster errors test_cluster.py's ERRORS do not reach, by the environment
# that raises each (resolve_cluster, then what ParameterServer checks).
TORCHRUN_2 = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
MORE_CLUSTER_ERRORS = {
    "disagreement": {**TORCHRUN_2, "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "0",
                     "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234"},
    "world_negative": {**TORCHRUN_2, "RANK": "0", "WORLD_SIZE": "-2"},
    "slurm_empty_host": {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                         "SLURM_NODELIST": "a,,b", "SLURM_JOB_ID": "1"},
    "keras_bad_port": {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:0,10.0.0.2:1",
                       "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "0"},
    "ps_none": TORCHRUN_2,
    "ps_evaluator": {"TF_CONFIG": '{"cluster": {"chief": ["h:1"], "worker": ["h:2"], "ps": ["h:3"]}, '
                                 '"task": {"type": "evaluator", "index": 0}}'},
    "ps_no_chief": {"TF_CONFIG": '{"cluster": {"worker": ["h:1", "h:2"], "ps": ["h:3"]}, '
                                '"task": {"type": "worker", "index": 0}}'},
    "ps_no_worker": {"TF_CONFIG": '{"cluster": {"chief": ["h:1"], "ps": ["h:3"]}, '
                                 '"task": {"type": "chief", "index": 0}}'},
}
# Launcher errors: the arguments of launch([sys.executable, "train.py"], ...) that raise each.
LAUNCH_ERRORS = {
    "nnodes_without_master": dict(nnodes=2, node_rank=1),
    "master_not_an_address": dict(master="10.0.0.1"),
    "master_bad_port": dict(master="10.0.0.1:http"),
    "nproc_zero": dict(nproc_per_node=0),
    "nnodes_zero": dict(nnodes=0),
    "node_rank_out_of_range": dict(nnodes=2, node_rank=2, master="10.0.0.1:29500"),
    "timeout_zero": dict(timeout=0),
    "rendezvous_timeout_zero": dict(rendezvous_timeout=0),
    "num_ps_negative": dict(num_ps=-1),
    "num_ps_leaves_no_worker": dict(nproc_per_node=2, num_ps=1),
    "foreign_cluster_variables": dict(env={"TF_CONFIG": '{"cluster": {}}'}),
    "command_not_a_list": dict(command="python train.py"),
    "command_cannot_start": dict(command=["/nonexistent/python", "train.py"]),
}
BUSY_PORT = 29500  # the port the errors page shows for "already in use"


def cluster_error_messages():
    """`{case: message}` of every cluster error case."""
    from keras_strategies.cluster import resolve_cluster
    from keras_strategies.errors import ClusterError
    from keras_strategies.strategies.parameter_server import _check_cluster
    from test_cluster import ERRORS

    cases = {name: environ for name, (environ, _) in ERRORS.items()}
    cases.update(MORE_CLUSTER_ERRORS)
    messages = {}
    for name, environ in cases.items():
        with pytest.raises(ClusterError) as info:
            _check_cluster(resolve_cluster(environ))
        messages[name] = str(info.value)
    return messages


def launch_error_messages():
    """`{case: message}` of every launcher error case (none starts a process)."""
    from keras_strategies.launch import LaunchError, launch

    messages = {}
    for name, options in LAUNCH_ERRORS.items():
        options = dict(options)
        command = options.pop("command", [sys.executable, "train.py"])
        with pytest.raises(LaunchError) as info:
            launch(command, **options)
        messages[f"launch {name}"] = str(info.value)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError) as info:
            launch([sys.executable, "train.py"], nnodes=2, master=f"127.0.0.1:{port}")
    messages["launch master_port_in_use"] = str(info.value).replace(str(port), str(BUSY_PORT))
    return messages


def test_the_errors_page_lists_every_cluster_and_launcher_error():
    page = " ".join((DOCS / "launching" / "errors.md").read_text().split())
    messages = {**cluster_error_messages(), **launch_error_messages()}
    missing = {name: message for name, message in messages.items() if " ".join(message.split()) not in page}
    assert not missing, missing


def test_every_test_a_page_cites_exists():
    cited = set()
    for page in guide_pages():
        cited.update(re.findall(r"(tests/test_\w+\.py)::(test_\w+)", page.read_text()))
    assert len(cited) >= 20, cited
    for path, name in sorted(cited):
        assert re.search(rf"^\s*def {name}\(", (ROOT / path).read_text(), re.MULTILINE), f"{path}::{name}"


def test_the_build_hook_names_a_public_object_without_a_docstring():
    griffe = pytest.importorskip("griffe", reason='griffe comes with mkdocstrings: pip install -e ".[docs]"')
    import importlib.util

    spec = importlib.util.spec_from_file_location("public_docstrings", DOCS / "hooks" / "public_docstrings.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    module = griffe.visit("m", filepath=pathlib.Path("m.py"), code=textwrap.dedent('''
        class A:
            """Documented.

            Attributes:
                size: described here.
            """
            size = 1
            count = 2

            def run(self):
                pass

            @property
            def name(self):
                """Documented."""

            def _private(self):
                pass
    '''))
    assert hook._undocumented(module["A"]) == ["m.A.count", "m.A.run"]


@pytest.mark.skipif(BACKEND != "jax", reason="the site does not depend on the backend: built on the jax run only")
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason='mkdocs is not installed: pip install -e ".[docs]"')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert (tmp_path / "site" / "reference" / "auto" / "index.html").exists()


def test_the_feature_table_lists_every_case_as_the_tests_run_it():
    """docs/keras-features.md's case-by-case table has one row per case of
    tests/features.py, and its ParameterServer column says what
    tests/test_parameter_server.py runs on each backend."""
    from features import CASES
    from test_parameter_server import PS_FEATURES

    rows = dict(re.findall(r"^\| `([a-z0-9_]+)` \|(.*)$", (ROOT / "docs" / "keras-features.md").read_text(), re.M))
    assert sorted(rows) == sorted(case.name for case in CASES)
    for name, row in rows.items():
        ps = row.rsplit("|", 2)[-2].strip()
        if name in PS_FEATURES["torch"]:
            assert ps == "✅", (name, ps)
        elif f"!{name}" in PS_FEATURES["torch"]:
            assert "refused with a clear error" in ps, (name, ps)
        elif name in PS_FEATURES["tensorflow"]:
            assert ps.startswith("✅ TensorFlow;") and "not run here" in ps, (name, ps)
        else:
            assert ps.startswith("n/a"), (name, ps)


def test_the_readmes_test_command_is_what_ci_runs():
    """The README's second command (fresh machine: install, run the tests)
    installs what `.ci/run` installs and runs the same test command, so the
    README's suite is CI's, mkdocs included; the site's home page shows the
    same two commands."""
    fresh = re.compile(r"```bash\n(.*?)```", re.DOTALL)
    block = fresh.search((ROOT / "README.md").read_text())[1]
    assert fresh.search((DOCS / "index.md").read_text())[1] == block
    command = [line for line in block.splitlines() if line.strip() and not line.startswith("#")][1]
    ci = (ROOT / ".ci" / "run").read_text()
    extras = re.compile(r'pip install (?:-q )?-e "\.\[([a-z,]+)\]"')
    assert set(extras.search(command)[1].split(",")) == set(extras.search(ci)[1].split(",")), (command, ci)
    test_command = "python tests/run_all.py"
    assert command.rstrip().endswith(test_command), command
    assert ci.rstrip().splitlines()[-1].strip() == test_command, ci
