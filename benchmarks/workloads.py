"""The benchmark workloads: Keras models, equivalent torch.nn models, generated data.

Every measurement of one workload trains the same architecture on the same
generated arrays (seeded), so A (keras_strategies) and B (the native way) see
identical inputs.
"""

import numpy as np

WORKLOADS = ("mlp", "cnn", "bn_convnet")

INPUT_SHAPES = {"mlp": (784,), "cnn": (28, 28, 1), "bn_convnet": (28, 28, 1)}

# The optimizers Keras users pick most, each with its torch.optim twin for the
# hand-written DDP loops: name -> (class name, keyword arguments), the same
# hyper-parameters on both sides.
OPTIMIZERS = {
    "adam": ("Adam", dict(learning_rate=1e-3)),
    "sgd": ("SGD", dict(learning_rate=1e-2)),
    "momentum": ("SGD", dict(learning_rate=1e-2, momentum=0.9)),
    "adamw": ("AdamW", dict(learning_rate=1e-3, weight_decay=0.004)),
}


def describe_optimizer(name):
    cls, kwargs = OPTIMIZERS[name]
    return f"{cls}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


def keras_optimizer(name):
    import keras

    cls, kwargs = OPTIMIZERS[name]
    return getattr(keras.optimizers, cls)(**kwargs)


def compiled_keras(workload, optimizer):
    """`build_keras(workload)` from seed 0, compiled as every measurement
    compiles it (`optimizer` a name in `OPTIMIZERS`; sparse cross-entropy from
    logits, no metrics): two calls give identical models."""
    import keras

    set_seed(0)
    model = build_keras(workload)
    model.compile(optimizer=keras_optimizer(optimizer),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def add_one_process_arguments(parser, optimizer="adam"):
    """The options of the scripts that train two models in one process, in
    turns (same_process.py, patch_ab.py): workload, optimizer, batch, steps,
    epochs per fit, rounds."""
    parser.add_argument("--workload", default="mlp", choices=list(WORKLOADS))
    parser.add_argument("--optimizer", default=optimizer, choices=sorted(OPTIMIZERS))
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--steps", type=int, default=200, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fit call")
    parser.add_argument("--rounds", type=int, default=8, help="fit calls per method after the first")


def torch_optimizer(name, parameters):
    import torch

    cls, kwargs = OPTIMIZERS[name]
    kwargs = dict(kwargs)
    return getattr(torch.optim, cls)(parameters, lr=kwargs.pop("learning_rate"), **kwargs)


def make_data(workload, num_samples, seed=0):
    """Generated inputs (float32) and integer labels 0..9, the same on every call."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, *INPUT_SHAPES[workload]), dtype=np.float32)
    y = rng.integers(0, 10, size=(num_samples,)).astype("int32")
    return x, y


def set_seed(seed):
    """`keras.utils.set_random_seed` minus its TensorFlow import on the JAX and
    torch backends (seconds of start-up per measured process)."""
    import random

    import keras
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    if keras.backend.backend() == "tensorflow":
        return keras.utils.set_random_seed(seed)
    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def build_keras(workload, synchronized_bn=False):
    """The Keras model; import keras only after the backend and threads are set.

    `synchronized_bn`: BatchNormalization(synchronized=True), TensorFlow's own
    way of computing the statistics over every replica under tf.distribute.
    """
    import keras
    from keras import layers

    if workload == "mlp":
        return keras.Sequential([
            keras.Input((784,)),
            layers.Dense(256, activation="relu"),
            layers.Dense(256, activation="relu"),
            layers.Dense(10),
        ])
    if workload == "cnn":
        return keras.Sequential([
            keras.Input((28, 28, 1)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(10),
        ])
    if workload == "bn_convnet":
        return keras.Sequential([
            keras.Input((28, 28, 1)),
            layers.Conv2D(16, 3, use_bias=False),
            layers.BatchNormalization(synchronized=synchronized_bn),
            layers.ReLU(),
            layers.MaxPooling2D(2),
            layers.Conv2D(32, 3, use_bias=False),
            layers.BatchNormalization(synchronized=synchronized_bn),
            layers.ReLU(),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ])
    raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")


def build_torch(workload):
    """The equivalent plain torch.nn model (NCHW; input is transposed by the caller).

    bn_convnet uses plain BatchNorm2d: per-process statistics, unlike
    keras_strategies' MultiWorkerMirrored on torch, which computes them over the
    global batch; the lower bound is therefore slightly cheaper than exact.
    """
    from torch import nn

    if workload == "mlp":
        return nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    if workload == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
        )
    if workload == "bn_convnet":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
    raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")


def tf_multi_worker_strategy():
    """A plain `tf.distribute.MultiWorkerMirroredStrategy` over the processes
    of a launch (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Each worker's
    gRPC address is found as keras_strategies finds it (a rendezvous at
    MASTER_ADDR:MASTER_PORT): TensorFlow needs every address up front, the
    launcher gives only the coordinator's."""
    import os

    import tensorflow as tf

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    from keras_strategies.cluster.rendezvous import exchange_addresses
    from keras_strategies.launch.ports import reserve_port

    with reserve_port() as reservation:
        addresses = exchange_addresses(f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", rank, world,
                                       reservation.port, 120)
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": addresses}), task_type="worker", task_id=rank, rpc_layer="grpc")
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
