"""Test setup: the suite runs once per backend (KERAS_BACKEND set per run).

On a CPU-only machine two replicas come from two logical (TensorFlow) or
virtual (JAX) CPU devices. They exist only if asked for before the backend
starts, so a strategy over them is created here, at collection time, which
is also the documented way for a user.
"""

import os

import keras
import pytest

import keras_strategies as ks

BACKEND = keras.backend.backend()

if BACKEND in ("tensorflow", "jax"):
    REPLICA_DEVICES = ["cpu:0", "cpu:1"]
    ks.Mirrored(devices=REPLICA_DEVICES)  # before the backend starts
else:
    REPLICA_DEVICES = ["cpu:0"]  # torch: one process = one CPU device


@pytest.fixture
def replica_devices():
    return list(REPLICA_DEVICES)


def pytest_report_header(config):
    return f"keras backend: {BACKEND} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')})"
