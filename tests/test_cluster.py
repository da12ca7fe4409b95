"""The cluster description: every source, precedence, agreement and every error.

Pure Python: each case passes a dict as the environment.
"""

import errno
import json
import socket

import pytest

from keras_strategies.cluster import ClusterError, ClusterSpec, resolve_cluster
from keras_strategies.cluster.slurm import expand_hostlist as _expand_hostlist
from keras_strategies.errors import StrategyError
from keras_strategies.launch import ports
from keras_strategies.launch.ports import free_port, port_in_use, reserve_port

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)


def tf_config(cluster, task_type="worker", index=0):
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


TORCHRUN_1_OF_4 = {
    "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
}
KERAS_1_OF_2 = {
    "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:1234",
    "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
    "KERAS_DISTRIBUTION_PROCESS_ID": "1",
}
SLURM_3_OF_4 = {
    "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODELIST": "node[07-08]", "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "4242",
}
TWO_WORKERS = {"worker": ["h0:2222", "h1:2222"]}
CHIEF_AND_WORKERS = {"chief": ["h0:1"], "worker": ["h0:2", "h1:3"], "ps": ["h2:4"], "evaluator": ["h3:5"]}

# (environment, expected fields). Fields not listed are not checked.
CASES = {
    "nothing": ({}, dict(rank=0, world_size=1, local_rank=0, local_world_size=1,
                         node_rank=0, coordinator=None, source="none", task_type="worker")),
    "tf_worker0": (tf_config(TWO_WORKERS), dict(rank=0, world_size=2, coordinator="h0:2222",
                   source="TF_CONFIG", task_type="worker", task_index=0, tf_cluster=TWO_WORKERS)),
    "tf_worker1": (tf_config(TWO_WORKERS, index=1), dict(rank=1, world_size=2, node_rank=1,
                   local_rank=0, local_world_size=1)),
    "tf_chief": (tf_config(CHIEF_AND_WORKERS, "chief"), dict(rank=0, world_size=3, local_rank=0,
                 local_world_size=2, node_rank=0, coordinator="h0:1", task_type="chief")),
    "tf_worker_after_chief": (tf_config(CHIEF_AND_WORKERS, "worker", 0), dict(
        rank=1, world_size=3, local_rank=1, local_world_size=2, node_rank=0, task_index=0)),
    "tf_worker_other_host": (tf_config(CHIEF_AND_WORKERS, "worker", 1), dict(
        rank=2, local_rank=0, local_world_size=1, node_rank=1)),
    "tf_ps": (tf_config(CHIEF_AND_WORKERS, "ps", 0), dict(
        rank=-1, world_size=3, local_rank=-1, node_rank=-1, task_type="ps", coordinator="h0:1")),
    "tf_evaluator": (tf_config(CHIEF_AND_WORKERS, "evaluator", 0), dict(
        rank=-1, world_size=3, task_type="evaluator", task_index=0)),
    "tf_single": (tf_config({"worker": ["localhost:5000"]}), dict(
        rank=0, world_size=1, coordinator="localhost:5000")),
    "tf_empty_object": ({"TF_CONFIG": "{}"}, dict(source="none", world_size=1)),
    "torchrun": (TORCHRUN_1_OF_4, dict(rank=1, world_size=4, local_rank=1, local_world_size=2,
                 node_rank=0, coordinator="10.0.0.1:29500", source="torchrun", task_type="worker",
                 task_index=1, tf_cluster=None)),
    "torchrun_minimal": ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": "1234"}, dict(rank=1, local_rank=1, local_world_size=2,
                                                       node_rank=0)),
    "torchrun_node_rank": ({**TORCHRUN_1_OF_4, "RANK": "3", "GROUP_RANK": "1"}, dict(
        rank=3, node_rank=1)),
    "torchrun_ipv6": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "::1", "MASTER_PORT": "1"},
                      dict(coordinator="[::1]:1")),
    "torchrun_single_no_master": ({"RANK": "0", "WORLD_SIZE": "1"}, dict(
        rank=0, world_size=1, coordinator=None, source="torchrun")),
    "keras": (KERAS_1_OF_2, dict(rank=1, world_size=2, local_rank=0, local_world_size=1,
              node_rank=1, coordinator="10.0.0.1:1234", source="KERAS_DISTRIBUTION")),
    "keras_coordinator_only_loopback": ({**KERAS_1_OF_2, "KERAS_DISTRIBUTION_JOB_ADDRESSES":
                                         "127.0.0.1:1234"}, dict(local_rank=1, local_world_size=2,
                                                                node_rank=0)),
    "keras_coordinator_only_remote": ({**KERAS_1_OF_2, "KERAS_DISTRIBUTION_JOB_ADDRESSES":
                                       "10.0.0.1:1234"}, dict(local_rank=0, node_rank=1)),
    "keras_same_host": ({**KERAS_1_OF_2, "KERAS_DISTRIBUTION_JOB_ADDRESSES":
                         "127.0.0.1:1,127.0.0.1:2"}, dict(local_rank=1, local_world_size=2)),
    "keras_single": ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "1", "KERAS_DISTRIBUTION_PROCESS_ID": "0"},
                     dict(world_size=1, coordinator=None, source="KERAS_DISTRIBUTION")),
    "slurm": (SLURM_3_OF_4, dict(rank=3, world_size=4, local_rank=1, local_world_size=2,
              node_rank=1, coordinator="node07:19242", source="SLURM", task_index=3)),
    "slurm_master_port": ({**SLURM_3_OF_4, "MASTER_PORT": "23456"}, dict(coordinator="node07:23456")),
    "slurm_master_addr": ({**SLURM_3_OF_4, "MASTER_ADDR": "10.1.1.1"}, dict(coordinator="10.1.1.1:19242")),
    "slurm_list": ({**SLURM_3_OF_4, "SLURM_NODELIST": "a1,a2"}, dict(coordinator="a1:19242")),
    "slurm_plain_host": ({**SLURM_3_OF_4, "SLURM_NODELIST": "host"}, dict(coordinator="host:19242")),
    "slurm_per_node": ({**SLURM_3_OF_4, "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": ""},
                       dict(local_world_size=2, node_rank=1)),
    "slurm_job_nodelist": ({**{k: v for k, v in SLURM_3_OF_4.items() if k != "SLURM_NODELIST"},
                            "SLURM_JOB_NODELIST": "gpu[3-4]"}, dict(coordinator="gpu3:19242")),
    "slurm_one_task": ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}, dict(source="none", world_size=1)),
    # parameter servers: TF_CONFIG's "ps" tasks, or the last KERAS_STRATEGIES_NUM_PS processes
    "tf_ps_count": (tf_config(CHIEF_AND_WORKERS, "ps", 0), dict(num_ps=1, task_type="ps", process_index=3)),
    "num_ps_chief": ({**TORCHRUN_1_OF_4, "RANK": "0", "KERAS_STRATEGIES_NUM_PS": "1"}, dict(
        rank=0, world_size=3, task_type="chief", task_index=0, num_ps=1, process_index=0)),
    "num_ps_worker": ({**TORCHRUN_1_OF_4, "RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1",
                       "KERAS_STRATEGIES_NUM_PS": "1"}, dict(
        rank=2, world_size=3, task_type="worker", task_index=1, num_ps=1, process_index=2)),
    "num_ps_server": ({**TORCHRUN_1_OF_4, "RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1",
                       "KERAS_STRATEGIES_NUM_PS": "1"}, dict(
        rank=-1, world_size=3, task_type="ps", task_index=0, num_ps=1, process_index=3)),
    "num_ps_zero": ({**TORCHRUN_1_OF_4, "KERAS_STRATEGIES_NUM_PS": "0"}, dict(num_ps=0, task_type="worker")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sources(name):
    environ, expected = CASES[name]
    spec = resolve_cluster(environ)
    assert isinstance(spec, ClusterSpec)
    got = {field: getattr(spec, field) for field in expected}
    assert got == expected
    assert spec.is_chief == (spec.rank == 0)
    assert spec.is_multi_process == (spec.world_size > 1)


def test_default_reads_os_environ(monkeypatch):
    for name in ("TF_CONFIG", "RANK", "WORLD_SIZE", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                 "KERAS_DISTRIBUTION_PROCESS_ID", "KERAS_DISTRIBUTION_JOB_ADDRESSES", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_cluster().source == "torchrun"


@pytest.mark.parametrize(
    "environ, source",
    [
        ({**tf_config(TWO_WORKERS, index=1), **TORCHRUN_1_OF_4, "WORLD_SIZE": "2",
          "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "TF_CONFIG"),
        ({**TORCHRUN_1_OF_4, **KERAS_1_OF_2, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
          "LOCAL_RANK": "0"}, "torchrun"),
        ({**KERAS_1_OF_2, **SLURM_3_OF_4, "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
          "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_LOCALID": "0"}, "KERAS_DISTRIBUTION"),
        ({**TORCHRUN_1_OF_4, "SLURM_NTASKS": "1"}, "torchrun"),
    ],
    ids=["tf_over_torchrun", "torchrun_over_keras", "keras_over_slurm", "slurm_single_ignored"],
)
def test_precedence_when_sources_agree(environ, source):
    assert resolve_cluster(environ).source == source


@pytest.mark.parametrize(
    "environ, names",
    [
        ({**tf_config(TWO_WORKERS, index=1), **TORCHRUN_1_OF_4}, ["TF_CONFIG", "WORLD_SIZE"]),
        ({**TORCHRUN_1_OF_4, **KERAS_1_OF_2, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
          "LOCAL_WORLD_SIZE": "1"}, ["RANK", "KERAS_DISTRIBUTION_PROCESS_ID"]),
        ({**KERAS_1_OF_2, **SLURM_3_OF_4}, ["KERAS_DISTRIBUTION_NUM_PROCESSES", "SLURM_NTASKS"]),
        ({**TORCHRUN_1_OF_4, **SLURM_3_OF_4}, ["RANK", "SLURM_PROCID"]),
    ],
    ids=["tf_torchrun", "torchrun_keras", "keras_slurm", "torchrun_slurm"],
)
def test_disagreement_names_both(environ, names):
    with pytest.raises(ClusterError) as info:
        resolve_cluster(environ)
    for name in names:
        assert name in str(info.value)
    assert "disagree" in str(info.value)


def test_launcher_inside_slurm_is_not_a_disagreement():
    # srun --ntasks-per-node=1 keras-strategies launch --nproc-per-node 2 ...:
    # SLURM describes the launcher (one task per node), RANK/... this process.
    environ = {**TORCHRUN_1_OF_4, **SLURM_3_OF_4, "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
               "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "0",
               "KERAS_STRATEGIES_LAUNCHED": "1"}
    spec = resolve_cluster(environ)
    assert (spec.source, spec.rank, spec.world_size) == ("torchrun", 1, 4)


def without(environ, *names):
    return {k: v for k, v in environ.items() if k not in names}


ERRORS = {
    # TF_CONFIG
    "tf_bad_json": ({"TF_CONFIG": "{cluster: 1"}, ["TF_CONFIG", "JSON"]),
    "tf_not_object": ({"TF_CONFIG": "[1]"}, ["TF_CONFIG", "object"]),
    "tf_no_cluster": ({"TF_CONFIG": json.dumps({"task": {"type": "worker", "index": 0}})},
                      ["TF_CONFIG", '"cluster"']),
    "tf_no_task": ({"TF_CONFIG": json.dumps({"cluster": TWO_WORKERS})}, ["TF_CONFIG", '"task"']),
    "tf_unknown_task_type": (tf_config(TWO_WORKERS, "master"), ["TF_CONFIG", "'master'"]),
    "tf_unknown_cluster_type": (tf_config({**TWO_WORKERS, "boss": ["x:1"]}), ["TF_CONFIG", "'boss'"]),
    "tf_index_out_of_range": (tf_config(TWO_WORKERS, index=2), ["TF_CONFIG", "index 2", "0..1"]),
    "tf_negative_index": (tf_config(TWO_WORKERS, index=-1), ["TF_CONFIG", "index"]),
    "tf_non_integer_index": (tf_config(TWO_WORKERS, index="one"), ["TF_CONFIG", "index"]),
    "tf_missing_index": ({"TF_CONFIG": json.dumps({"cluster": TWO_WORKERS, "task": {"type": "worker"}})},
                         ["TF_CONFIG", '"index"']),
    "tf_type_not_in_cluster": (tf_config(TWO_WORKERS, "chief"), ["TF_CONFIG", "'chief'"]),
    "tf_two_chiefs": (tf_config({"chief": ["a:1", "b:1"]}, "chief"), ["TF_CONFIG", "chief"]),
    "tf_no_training_task": (tf_config({"ps": ["a:1"]}, "ps"), ["TF_CONFIG", '"worker"']),
    "tf_bad_address": (tf_config({"worker": ["nohostport"]}), ["TF_CONFIG", "host:port"]),
    "tf_bad_port": (tf_config({"worker": ["h:99999"]}), ["TF_CONFIG", "port"]),
    "tf_addresses_not_list": (tf_config({"worker": "h:1"}), ["TF_CONFIG", "list"]),
    # torchrun
    "rank_without_world": ({"RANK": "0"}, ["RANK", "WORLD_SIZE"]),
    "world_without_rank": ({"WORLD_SIZE": "2"}, ["WORLD_SIZE", "RANK"]),
    "rank_too_big": ({**TORCHRUN_1_OF_4, "RANK": "4"}, ["RANK=4", "WORLD_SIZE=4"]),
    "rank_negative": ({**TORCHRUN_1_OF_4, "RANK": "-1"}, ["RANK", "negative"]),
    "rank_not_integer": ({**TORCHRUN_1_OF_4, "RANK": "one"}, ["RANK", "integer"]),
    "world_zero": ({**TORCHRUN_1_OF_4, "WORLD_SIZE": "0"}, ["WORLD_SIZE"]),
    "local_rank_too_big": ({**TORCHRUN_1_OF_4, "LOCAL_RANK": "2"}, ["LOCAL_RANK", "LOCAL_WORLD_SIZE"]),
    "local_rank_not_integer": ({**TORCHRUN_1_OF_4, "LOCAL_RANK": "1.5"}, ["LOCAL_RANK", "integer"]),
    "local_world_too_big": ({**TORCHRUN_1_OF_4, "LOCAL_WORLD_SIZE": "5"}, ["LOCAL_WORLD_SIZE"]),
    "group_rank_negative": ({**TORCHRUN_1_OF_4, "GROUP_RANK": "-2"}, ["GROUP_RANK"]),
    "master_port_not_port": ({**TORCHRUN_1_OF_4, "MASTER_PORT": "http"}, ["MASTER_PORT", "port"]),
    "master_port_out_of_range": ({**TORCHRUN_1_OF_4, "MASTER_PORT": "70000"}, ["MASTER_PORT"]),
    "no_master_addr": (without(TORCHRUN_1_OF_4, "MASTER_ADDR"), ["MASTER_ADDR"]),
    "no_master_port": (without(TORCHRUN_1_OF_4, "MASTER_PORT"), ["MASTER_PORT"]),
    # KERAS_DISTRIBUTION
    "keras_count_mismatch": ({**KERAS_1_OF_2, "KERAS_DISTRIBUTION_NUM_PROCESSES": "3"},
                             ["KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES"]),
    "keras_no_num": (without(KERAS_1_OF_2, "KERAS_DISTRIBUTION_NUM_PROCESSES"),
                     ["KERAS_DISTRIBUTION_NUM_PROCESSES"]),
    "keras_no_id": (without(KERAS_1_OF_2, "KERAS_DISTRIBUTION_PROCESS_ID"),
                    ["KERAS_DISTRIBUTION_PROCESS_ID"]),
    "keras_no_addresses": (without(KERAS_1_OF_2, "KERAS_DISTRIBUTION_JOB_ADDRESSES"),
                           ["KERAS_DISTRIBUTION_JOB_ADDRESSES"]),
    "keras_id_too_big": ({**KERAS_1_OF_2, "KERAS_DISTRIBUTION_PROCESS_ID": "2"},
                         ["KERAS_DISTRIBUTION_PROCESS_ID"]),
    "keras_bad_address": ({**KERAS_1_OF_2, "KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b"},
                          ["KERAS_DISTRIBUTION_JOB_ADDRESSES", "host:port"]),
    "keras_empty_entry": ({**KERAS_1_OF_2, "KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,,b:1"},
                          ["KERAS_DISTRIBUTION_JOB_ADDRESSES", "empty"]),
    "keras_id_not_integer": ({**KERAS_1_OF_2, "KERAS_DISTRIBUTION_PROCESS_ID": "x"},
                             ["KERAS_DISTRIBUTION_PROCESS_ID", "integer"]),
    # SLURM
    "slurm_no_procid": (without(SLURM_3_OF_4, "SLURM_PROCID"), ["SLURM_PROCID", "srun"]),
    "slurm_no_localid": (without(SLURM_3_OF_4, "SLURM_LOCALID"), ["SLURM_LOCALID"]),
    "slurm_procid_too_big": ({**SLURM_3_OF_4, "SLURM_PROCID": "4"}, ["SLURM_PROCID", "SLURM_NTASKS"]),
    "slurm_ntasks_not_integer": ({**SLURM_3_OF_4, "SLURM_NTASKS": "four"}, ["SLURM_NTASKS"]),
    "slurm_no_nodelist": (without(SLURM_3_OF_4, "SLURM_NODELIST"), ["SLURM_NODELIST", "MASTER_ADDR"]),
    "slurm_no_port": (without(SLURM_3_OF_4, "SLURM_JOB_ID"), ["MASTER_PORT", "SLURM_JOB_ID"]),
    "slurm_bad_master_port": ({**SLURM_3_OF_4, "MASTER_PORT": "0"}, ["MASTER_PORT"]),
    "slurm_bad_nodelist": ({**SLURM_3_OF_4, "SLURM_NODELIST": "node[01-"}, ["SLURM_NODELIST"]),
    "slurm_bad_range": ({**SLURM_3_OF_4, "SLURM_NODELIST": "node[a-b]"}, ["SLURM_NODELIST"]),
    "slurm_localid_too_big": ({**SLURM_3_OF_4, "SLURM_LOCALID": "2"}, ["SLURM_LOCALID"]),
    # parameter servers
    "num_ps_leaves_no_worker": ({**TORCHRUN_1_OF_4, "KERAS_STRATEGIES_NUM_PS": "3"},
                                ["KERAS_STRATEGIES_NUM_PS=3", "leaves no worker", "at least 5"]),
    "num_ps_not_integer": ({**TORCHRUN_1_OF_4, "KERAS_STRATEGIES_NUM_PS": "one"},
                           ["KERAS_STRATEGIES_NUM_PS", "integer"]),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_name_the_variable(name):
    environ, fragments = ERRORS[name]
    with pytest.raises(ClusterError) as info:
        resolve_cluster(environ)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, StrategyError)


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("host", ["host"]),
        ("a1,a2", ["a1", "a2"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu[9-11]-ib,cpu1", ["gpu9-ib", "gpu10-ib", "gpu11-ib", "cpu1"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ],
)
def test_slurm_hostlist(text, hosts):
    assert _expand_hostlist(text) == hosts


def test_ports():
    port = free_port()
    assert 0 < port < 65536
    assert not port_in_use("127.0.0.1", port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert port_in_use("127.0.0.1", sock.getsockname()[1])


def test_a_quiet_port_is_free_and_below_the_range_the_kernel_hands_out(monkeypatch):
    """The launcher's port for rank 0 (full benchmark run: one run lost to a
    port another socket took before TensorFlow's server bound it)."""
    span = ports._ephemeral_range()
    for _ in range(20):
        port = ports.quiet_port()
        assert not port_in_use("127.0.0.1", port)
        if span is not None and span[0] > 21000:  # Linux: 32768
            assert 20000 <= port < span[0]
    monkeypatch.setattr(ports, "_ephemeral_range", lambda: (1024, 65535))  # no room below: free_port's answer
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        monkeypatch.setattr(ports, "free_port", lambda host="127.0.0.1": busy.getsockname()[1])
        assert ports.quiet_port() == busy.getsockname()[1]


def test_a_reserved_port_is_held_until_closed_and_a_server_starts_beside_it():
    reservation = reserve_port()
    try:
        with socket.socket() as plain:  # any other bind of the port fails while it is held
            with pytest.raises(OSError) as error:
                plain.bind(("127.0.0.1", reservation.port))
            assert error.value.errno == errno.EADDRINUSE
        with socket.socket() as server:  # but a server binding as gRPC and TCPStore do starts
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", reservation.port))
            server.listen()
            with socket.create_connection(("127.0.0.1", reservation.port), timeout=5):
                pass
    finally:
        reservation.close()
    with reserve_port() as other:
        port = other.port
    with socket.socket() as plain:  # closed: the port is free again
        plain.bind(("127.0.0.1", port))
