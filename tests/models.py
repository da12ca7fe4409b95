"""Small models and data shared by the tests."""

import os
import sys

import keras
import numpy as np

# one seeding helper for tests and benchmarks: keras.utils.set_random_seed
# without its TensorFlow import on JAX/torch (seconds per process)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from workloads import set_seed  # noqa: E402

FEATURES = 8
CLASSES = 3


def make_data(n=69, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=(n,)).astype("int32")
    return x, y


def functional(batch_norm=False):
    inputs = keras.Input((FEATURES,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    if batch_norm:
        h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def sequential(batch_norm=False):
    layers = [keras.Input((FEATURES,)), keras.layers.Dense(16, activation="relu")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(CLASSES, activation="softmax"))
    return keras.Sequential(layers)


def convnet(batch_norm=False):
    """Convolution and pooling (and BatchNormalization over 4D batches) on the
    same 8 features, seen as a 4x4x3 image after a Dense layer."""
    layers = keras.layers
    inputs = keras.Input((FEATURES,))
    h = layers.Reshape((4, 4, 3))(layers.Dense(48)(inputs))
    h = layers.Conv2D(6, 3, padding="same", activation=None if batch_norm else "relu")(h)
    if batch_norm:
        h = layers.ReLU()(layers.BatchNormalization()(h))
    h = layers.MaxPooling2D(2)(h)
    h = layers.AveragePooling2D(2, strides=1, padding="same")(h)
    outputs = layers.Dense(CLASSES, activation="softmax")(layers.Flatten()(h))
    return keras.Model(inputs, outputs)


class Subclassed(keras.Model):
    def __init__(self, batch_norm=False):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.norm = keras.layers.BatchNormalization() if batch_norm else None
        self.out = keras.layers.Dense(CLASSES, activation="softmax")

    def build(self, input_shape):
        self.hidden.build(input_shape)
        if self.norm is not None:
            self.norm.build((None, 16))
        self.out.build((None, 16))

    def call(self, x, training=False):
        h = self.hidden(x)
        if self.norm is not None:
            h = self.norm(h, training=training)
        return self.out(h)


class CustomTrainStep(Subclassed):
    """A model with its own train_step wrapping Keras's (counted in Python,
    which runs per trace on TF/JAX and per step on torch)."""

    train_step_calls = 0

    def train_step(self, *args, **kwargs):
        type(self).train_step_calls += 1
        return super().train_step(*args, **kwargs)


MODELS = {
    "functional": functional,
    "sequential": sequential,
    "convnet": convnet,
    "subclassed": Subclassed,
    "custom_train_step": CustomTrainStep,
}


def build(kind, weights=None, batch_norm=False, optimizer=None):
    model = MODELS[kind](batch_norm=batch_norm)
    model.build((None, FEATURES))
    if weights is not None:
        model.set_weights(weights)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(learning_rate=0.1),
        loss="sparse_categorical_crossentropy",
        metrics=["sparse_categorical_accuracy"],
    )
    return model


def initial_weights(kind, batch_norm=False):
    set_seed(1234)
    model = MODELS[kind](batch_norm=batch_norm)
    model.build((None, FEATURES))
    return model.get_weights()


class RecordingCheckpoint(keras.callbacks.ModelCheckpoint):
    """A ModelCheckpoint that also appends "<pid> <path>" to `record` at each
    save, so a test can tell which process wrote into which path (a copy made
    for a non-chief worker records its own pid and its scratch path)."""

    def __init__(self, filepath, record, **kwargs):
        super().__init__(filepath, **kwargs)
        self.record = record

    def _save_model(self, epoch, batch, logs):
        super()._save_model(epoch, batch, logs)
        with open(self.record, "a") as f:
            f.write(f"{os.getpid()} {self.filepath}\n")


def writers(record, path):
    """The pids that saved into `path`, from a RecordingCheckpoint's record."""
    with open(record) as f:
        return {line.split(" ", 1)[0] for line in f.read().splitlines() if line.split(" ", 1)[1] == path}


class RowCounter(keras.layers.Layer):
    """Identity layer that records which rows this process computes, at run
    time (each replica's or device's part, not the batch it was handed), by
    the value of their first feature (give each row its index there):
    `tf.numpy_function` on TensorFlow, a partitioned `jax.debug.callback` on
    JAX (one call per local device shard), plain Python on PyTorch. Symbolic
    builds record nothing."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = []

    def _record(self, first):
        self.rows.extend(int(round(float(v))) for v in np.asarray(first).ravel())

    def call(self, x):
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            def record(first):
                self._record(first)
                return np.int32(0)

            token = tf.numpy_function(record, [x[:, 0]], tf.int32)
            with tf.control_dependencies([token]):
                return tf.identity(x)
        if backend == "jax":
            import jax

            jax.debug.callback(lambda a: self._record(a[:, 0]), x, partitioned=True)
            return x
        if x.device.type != "meta":
            self._record(x[:, 0].detach().cpu().numpy())
        return x


def listening_sockets(pid=None):
    """The `(address, port)` of every TCP socket process `pid` (default: this
    one) listens on, read from /proc (Linux)."""
    import socket
    import struct

    pid = pid or os.getpid()
    mine = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                (address, port), state, inode = fields[1].split(":"), fields[3], fields[9]
                if state != "0A" or inode not in mine:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return sorted(found)


def is_loopback_address(address):
    """127.x, ::1 or an IPv4-mapped 127.x."""
    return address.startswith(("127.", "::ffff:127.")) or address == "::1"


# -- resume (tests/test_resume.py, tests/resume_job.py) -----------------------
RESUME_EPOCHS, RESUME_BATCH, RESUME_SAVE_FREQ = 3, 8, 4  # 69 examples: 9 batches an epoch
RESUME_JOB_SEED = 7  # Keras's seed in tests/resume_job.py after the model is built (its shuffle orders)


def resume_model(optimizer="adam", width=16, seed=1):
    """A small classifier with a decaying learning rate (Adam, or SGD with
    momentum); `set_seed(seed)` also fixes the shuffle seed."""
    set_seed(seed)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(CLASSES, activation="softmax")])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=5, decay_rate=0.8)
    optimizer = (keras.optimizers.Adam(schedule) if optimizer == "adam"
                 else keras.optimizers.SGD(schedule, momentum=0.9))
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def resume_fit(model, backup_dir, distribution, callbacks=(), delete=False):
    """`fit` with `BackupAndRestore(backup_dir, save_freq=RESUME_SAVE_FREQ)`;
    returns the epochs it trained."""
    x, y = make_data(69)
    backup = keras.callbacks.BackupAndRestore(backup_dir, save_freq=RESUME_SAVE_FREQ, delete_checkpoint=delete)
    history = model.fit(x, y, batch_size=RESUME_BATCH, epochs=RESUME_EPOCHS, verbose=0,
                        distribution=distribution, callbacks=[backup, *callbacks])
    return history.epoch


class StopBefore(keras.callbacks.Callback):
    """Interrupts a run before batch `at` (1-based, counted over the whole
    run): `how` is `"RAISE"` (a RuntimeError) or a signal name sent to this
    process (`"KILL"`, `"TERM"`) when `this_rank` is true."""

    def __init__(self, at, how, this_rank=True):
        super().__init__()
        self.at, self.how, self.this_rank = at, how, this_rank

    def on_train_batch_begin(self, batch, logs=None):
        import signal

        done = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if done + 1 != self.at:
            return
        if self.how == "RAISE":
            raise RuntimeError(f"stopped before batch {self.at}")
        if self.this_rank:
            os.kill(os.getpid(), getattr(signal, "SIG" + self.how))


def largest_difference(a, b):
    """The largest absolute difference between two lists of arrays."""
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b))
