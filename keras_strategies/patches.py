"""Every change this package makes to Keras, in one table, and how each is applied.

Keras 3 has no hook for a distribution strategy in `fit` on TensorFlow or
PyTorch, and has bugs under the engines' own strategies; this package fixes
them by replacing a few Keras functions. Each replacement is a `Patch` below,
with one line of why and the Keras issue where there is one. Three scopes:

- `"installed"`: from `import keras_strategies` until
  `keras_strategies.uninstall()`. Only the `distribution=` argument of
  `fit`/`evaluate`/`predict` and the record of which strategy's scope a model
  was built in. With no strategy given or active they call Keras's own method
  unchanged.
- `"run"`: a Keras module or class attribute replaced only while one of this
  package's strategies runs `fit`/`evaluate`/`predict` (the strategy's
  implementation names them in `keras_patches`), and restored after, so plain
  Keras in the same process behaves exactly as without the package.
- `"model"`: an attribute of one model (or its optimizer or layers) replaced
  for the length of one run with `overriding()`; the class is untouched.

The replacements themselves live beside the code that needs them: in
`keras_strategies.plugin` for the installed ones, in
`keras_strategies.backends.<backend>.keras_fixes` for the others.
"""

import contextlib
import dataclasses
import fnmatch
import importlib
import threading
import warnings

# Keras versions this package is tested with: [low, high).
TESTED_KERAS = ("3.15.0", "3.16.0")


@dataclasses.dataclass(frozen=True)
class Patch:
    """One replacement of a Keras attribute.

    Attributes:
        name: a short id, used by the code that applies it.
        targets: `"module:Qualified.name"` paths of what is replaced; a last
            component may be a glob (`CallbackList.on_*`).
        replacement: `"module:factory"`: `factory(original)` returns the
            replacement of each target. Empty for `"model"` patches.
        scope: `"installed"`, `"run"` or `"model"` (see the module docstring).
        backends: the Keras backends it is used on.
        why: one line: what goes wrong without it.
        issue: the Keras issue, where there is one.
    """

    name: str
    targets: tuple
    replacement: str
    scope: str
    backends: tuple
    why: str
    issue: str = ""


_ALL = ("tensorflow", "jax", "torch")
_TF, _JAX, _TORCH = ("tensorflow",), ("jax",), ("torch",)
_FIXES = "keras_strategies.backends.{}.keras_fixes:{}"

PATCHES = (
    Patch("distribution-argument",
          ("keras.src.models.model:Model.fit", "keras.src.models.model:Model.evaluate",
           "keras.src.models.model:Model.predict"),
          "keras_strategies.plugin:with_distribution_argument", "installed", _ALL,
          "Keras's fit/evaluate/predict take no strategy; `distribution=` hands the call to one."),
    Patch("scope-ownership", ("keras.src.trainers.trainer:Trainer.__init__",),
          "keras_strategies.plugin:recording_scope_owner", "installed", _ALL,
          "A model built in `strategy.scope()` must remember that strategy (the tf.distribute idiom)."),
    Patch("tf-loss-share",
          ("keras.src.losses.loss:scale_loss_for_distribution",
           "keras.src.losses.loss:unscale_loss_for_distribution"),
          _FIXES.format("tensorflow", "share_scaled_loss"), "run", _TF,
          "Keras scales each replica's loss by 1/replicas, wrong for an unevenly split last batch."),
    Patch("tf-variable-updates",
          ("keras.src.backend.tensorflow.core:Variable.assign",
           "keras.src.backend.tensorflow.core:Variable.assign_add",
           "keras.src.backend.tensorflow.core:Variable.assign_sub"),
          _FIXES.format("tensorflow", "variable_update"), "run", _TF,
          "Keras's assign_add is assign(x + d): counted once per replica on CentralStorage's SUM "
          "variables, and not atomic on a parameter server (asynchronous updates were lost); in a "
          "replica-local optimizer apply each replica writes its own copy."),
    Patch("tf-symbolic-build",
          ("keras.src.backend.tensorflow.trainer:TensorFlowTrainer._maybe_symbolic_build",),
          _FIXES.format("tensorflow", "symbolic_build_from_spec"), "run", _TF,
          "Every fit/evaluate/predict (and validation) opens a distributed iterator for one batch, reduces "
          "it and drops the iterator mid-prefetch (~0.15 s; once a segfault in a TensorFlow thread); under "
          "MultiWorkerMirroredStrategy that batch is a PerReplica the build cannot read.",
          "keras-team/keras#20585"),
    Patch("keras-20585-reduce", ("keras.src.backend.tensorflow.trainer:reduce_per_replica",),
          _FIXES.format("tensorflow", "scalar_safe_reduce"), "run", _TF,
          "reduce_per_replica reduces scalar logs over axis 0 under a collective strategy.",
          "keras-team/keras#20585"),
    Patch("jax-indivisible-batch", ("keras.src.backend.jax.distribution_lib:distribute_data_input",),
          _FIXES.format("jax", "replicating_distribute_data_input"), "run", _JAX,
          "A batch that does not divide over the devices (the last one) raises IndivisibleError."),
    Patch("jax-uneven-device-put", ("keras.src.backend.jax.distribution_lib:distribute_tensor",),
          _FIXES.format("jax", "host_values_onto_mesh"), "run", _JAX,
          "jax.device_put of a host value onto a mesh over processes with different numbers of devices "
          "raises ValueError (its cross-process check assumes the same number everywhere); also active in "
          "MultiWorkerMirrored's scope on JAX, where variables are created."),
    Patch("jax-one-device-mesh", ("keras.src.backend.jax.distribution_lib:distribute_tensor",),
          _FIXES.format("jax", "mesh_shardings_kept"), "run", _JAX,
          "On a one-device mesh Keras keeps a single-device array (its metrics reset to zeros) as "
          "'equivalent' to the mesh's sharding; the jitted step sees a new input layout and compiles again."),
    Patch("jax-callbacks-local", ("keras.src.callbacks.callback_list:CallbackList.on_*",),
          _FIXES.format("jax", "without_distribution"), "run", _JAX,
          "A callback saving on the chief alone would create cross-process arrays the others never join."),
    Patch("torch-replica-batchnorm",
          ("keras.src.layers.normalization.batch_normalization:BatchNormalization._moments",),
          "keras_strategies.backends.torch.central_storage:replica_group_moments", "run", _TORCH,
          "CentralStorage replicas run in threads: BatchNormalization must see the global batch."),
    Patch("torch-copy-free-layouts",
          tuple(f"keras.src.backend.torch.nn:{op}" for op in (
              "conv", "max_pool", "average_pool", "adaptive_average_pool", "adaptive_max_pool")),
          "keras_strategies.backends.torch.layout:copy_free", "run", _TORCH,
          "Keras copies every channels_last conv/pool input to NCHW; a channels_last view copies "
          "nothing (upstream: keras PR 23199, issue 23649)."),
    Patch("tf-one-validation-iterator", ("keras.src.trainers.epoch_iterator:EpochIterator.reset",),
          "keras_strategies.backends.tensorflow.one_iterator:keeping_whole_epochs_iterator", "run", _TF,
          "evaluate drops its iterator at each validation of a fit: under Mirrored, CentralStorage or "
          "MultiWorkerMirrored a new distributed iterator each epoch, ~0.1 s of CPU and often 0.2-1.5 s of "
          "every worker's time (kept only for the endless validation datasets of "
          "backends/tensorflow/one_iterator.py)."),
    Patch("tf-dataset-rewrites",
          ("keras.src.trainers.data_adapters.array_data_adapter:ArrayDataAdapter.get_tf_dataset",),
          "keras_strategies.backends.tensorflow.one_iterator:with_default_rewrites", "run", _TF,
          "Keras's dataset of arrays turns TensorFlow's graph rewrites off; so built, dropping a distributed "
          "iterator still reading ahead (steps_per_epoch shorter than the data) could segfault TensorFlow 2.21's "
          "multi-device iterator on a busy machine; in a process bound to one core its autotuning is turned off "
          "(dropping an autotuned iterator there waited up to half the iterator's life)."),
    Patch("epoch-spare-iterator", ("keras.src.trainers.epoch_iterator:EpochIterator._enumerate_iterator",),
          "keras_strategies.implementation.resume:without_spare_iterator", "run", _ALL,
          "Each epoch's end makes an iterator the next epoch never uses (without steps_per_epoch): a "
          "tf.distribute multi-device iterator, ~0.15 s and its buffers filled, per epoch and validation."),
    Patch("unread-batch-logs",
          tuple(f"keras.src.callbacks.callback_list:CallbackList.on_{mode}_batch_{when}"
                for mode in ("train", "test", "predict") for when in ("begin", "end")),
          "keras_strategies.implementation.batch_hooks:logs_only_where_read", "run", _ALL,
          "At every batch Keras converts the logs to floats (on JAX and PyTorch in a thread pool) and so "
          "waits for the step, also when no callback reads them; ours (heartbeat, backups) never do."),
    Patch("resume-mid-epoch", ("keras.src.trainers.epoch_iterator:EpochIterator._enumerate_iterator",),
          "keras_strategies.implementation.resume:skipping_enumerate", "run", _ALL,
          "Keras's BackupAndRestore resumes at the start of the saved epoch (its saved step is never "
          "used): the first epoch of a resumed fit starts at the saved step."),
    Patch("tf-replica-local-optimizer",
          ("Optimizer.apply", "Optimizer._backend_update_step", "Optimizer._apply_weight_decay",
           "Optimizer._backend_increment_gradient_accumulators",
           "Optimizer._overwrite_model_variables_with_average_value", "Optimizer.assign",
           "Optimizer.assign_add", "Optimizer.assign_sub", "LossScaleOptimizer._tf_apply"), "", "model", _TF,
          "Keras's TF optimizer clips each replica's gradient (not the global one) and fails in a cond "
          "(gradient accumulation, EMA overwrite, loss scaling): all-reduce first, then apply per replica."),
    Patch("tf-multi-step", ("Model.make_train_function", "Model.make_test_function"), "", "model", _TF,
          "steps_per_execution > 1 under MirroredStrategy fails (a strategy.run inside a cond in Keras's "
          "loop: 'You must feed a value for placeholder tensor'); one loop without it."),
    Patch("tf-share-weighted-step", ("Model.train_step",), "", "model", _TF,
          "Each replica's loss is weighted by its share of the global batch (see tf-loss-share); with Keras's "
          "own train_step the count rides along with the gradient all-reduce (tf-replica-local-optimizer)."),
    Patch("tf-one-metrics-read", ("Model.get_metrics_result",), "", "model", _TF,
          "Each epoch's and validation's logs read every metric variable with its own reduction (across "
          "workers an all-reduce each); one reduction reads them all."),
    Patch("tf-synchronized-batchnorm", ("BatchNormalization.synchronized",), "", "model", _TF,
          "MirroredStrategy replicas' BatchNormalization statistics drift apart; use the global batch."),
    Patch("tf-one-allreduce-moments", ("BatchNormalization._moments",), "", "model", _TF,
          "Synchronized BatchNormalization all-reduces its sum, sum of squares and count one by one, and "
          "counts by summing ones as large as its input; one all-reduce, the count from the shape."),
    Patch("tf-strategy-attributes",
          ("Model._distribute_strategy", "Model._jit_compile", "Optimizer._distribution_strategy"),
          "", "model", _TF, "A model built outside the scope runs under the strategy for one call."),
    Patch("jax-late-layout", ("Model._symbolic_build",), "", "model", _JAX,
          "Optimizer slots and metrics created inside fit must be laid out on the mesh too."),
    Patch("jax-bounded-steps", ("Model._make_function",), "", "model", _JAX,
          "On host devices a fit dispatches steps without reading them until XLA's CPU client's queue of 32 "
          "per device is full; its next launch then waits on a thread the all-reduce needs, and XLA aborts."),
    Patch("jax-one-pass-moments", ("BatchNormalization._moments",), "", "model", _JAX,
          "Over a batch split across devices, Keras's mean-then-variance makes XLA all-reduce twice forward and "
          "twice backward a layer, one after the other; one pass (shifted by the moving mean): once each way."),
    Patch("jax-gathered-predict", ("Model.make_predict_function",), "", "model", _JAX,
          "Multi-process predict: each device computes its slice, and the outputs are gathered to every "
          "process (Keras's numpy conversion needs them whole); before, every device computed everything."),
    Patch("jax-central-storage-steps",
          ("Model.make_train_function", "Model.make_test_function", "Model.make_predict_function",
           "Optimizer.stateless_apply"), "", "model", _JAX,
          "CentralStorage moves variables to the compute devices and gradients back each step."),
    Patch("torch-ddp-step", ("Model.train_step", "Model.get_metrics_result", "Optimizer.apply"),
          "", "model", _TORCH,
          "The forward pass goes through DistributedDataParallel; metrics are reduced over workers."),
    Patch("torch-synced-build", ("Model._symbolic_build",), "", "model", _TORCH,
          "What Keras builds at the start of a run (optimizer slots, metrics) starts from rank 0's values."),
    Patch("torch-global-batchnorm", ("BatchNormalization._moments", "BatchNormalization.call"),
          "", "model", _TORCH, "BatchNormalization statistics over the global batch of every worker."),
    Patch("torch-fused-adam", ("Optimizer._backend_update_step",), "", "model", _TORCH,
          "Keras's torch Adam runs ten _foreach passes a step; torch's fused kernel computes the same."),
    Patch("torch-fused-sgd", ("Optimizer._backend_update_step",), "", "model", _TORCH,
          "Keras's torch SGD runs up to three _foreach passes a step after the division by the example count; "
          "torch's fused kernel computes the same in one."),
    Patch("torch-replicated-call", ("Model.call",), "", "model", _TORCH,
          "CentralStorage runs one replica of the model per compute device."),
    Patch("ps-capture-gradients", ("Optimizer.apply", "Optimizer.stateless_apply"), "", "model",
          ("torch", "jax"),
          "A ParameterServer worker sends its gradients to the servers instead of applying them."),
)
_BY_NAME = {patch.name: patch for patch in PATCHES}

_lock = threading.RLock()
_replaced = {}  # patch name -> [(owner, attribute, original, whether owner held it)]
_counts = {}  # patch name -> how many active() entries hold it


def get(name):
    """The `Patch` called `name`."""
    return _BY_NAME[name]


def _load(path):
    module, _, qualified = path.partition(":")
    owner = importlib.import_module(module)
    *parents, attribute = qualified.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, attribute


def _sites(patch):
    """`(owner, attribute)` of every target of `patch`."""
    sites = []
    for target in patch.targets:
        owner, attribute = _load(target)
        if any(c in attribute for c in "*?["):
            sites.extend((owner, a) for a in sorted(vars(owner)) if fnmatch.fnmatch(a, attribute))
        else:
            sites.append((owner, attribute))
    return sites


def _apply(patch):
    module, _, name = patch.replacement.partition(":")
    factory = getattr(importlib.import_module(module), name)
    replaced = []
    for owner, attribute in _sites(patch):
        own = attribute in vars(owner)  # else inherited: restored by deleting ours
        original = vars(owner)[attribute] if own else getattr(owner, attribute)
        replaced.append((owner, attribute, original, own))
        setattr(owner, attribute, factory(original))
    _replaced[patch.name] = replaced


def _restore(patch):
    for owner, attribute, original, own in reversed(_replaced.pop(patch.name, [])):
        if own:
            setattr(owner, attribute, original)
        else:
            delattr(owner, attribute)


def install(names):
    """Applies the named patches until `remove(names)` (each once, however often called)."""
    with _lock:
        for name in names:
            if not _counts.get(name):
                _apply(get(name))
            _counts[name] = 1


def remove(names):
    """Restores the named patches' originals, however many holders they had."""
    with _lock:
        for name in names:
            if _counts.pop(name, 0):
                _restore(get(name))


@contextlib.contextmanager
def active(names):
    """Applies the named `"run"` patches while entered (nested entries share them).

    Args:
        names: patch names from `PATCHES`.
    """
    names = tuple(names)
    with _lock:
        for name in names:
            if get(name).scope != "run":
                raise ValueError(f"patch {name!r} is not a run patch")
            if not _counts.get(name):
                _apply(get(name))
            _counts[name] = _counts.get(name, 0) + 1
    try:
        yield
    finally:
        with _lock:
            for name in reversed(names):  # last applied first: two patches of one target unwind in order
                if name not in _counts:
                    continue  # uninstall() restored it meanwhile
                _counts[name] -= 1
                if not _counts[name]:
                    del _counts[name]
                    _restore(get(name))


def applied():
    """The names of the patches in place now."""
    with _lock:
        return sorted(_counts)


@contextlib.contextmanager
def overriding(target, attribute, value, patch):
    """Replaces `target.<attribute>` on this one object while entered.

    The value goes into the object's own `__dict__` (Keras and
    `torch.nn.Module` attribute tracking never see it); what was there before
    comes back on exit.

    Args:
        target: a model, layer or optimizer.
        attribute: the attribute's name.
        value: what stands in for it.
        patch: the name of the `"model"` patch in `PATCHES` this belongs to.
    """
    if get(patch).scope != "model":
        raise ValueError(f"patch {patch!r} is not a model patch")
    missing = object()
    before = target.__dict__.get(attribute, missing)
    target.__dict__[attribute] = value
    try:
        yield
    finally:
        if before is missing:
            target.__dict__.pop(attribute, None)
        else:
            target.__dict__[attribute] = before


def _version_tuple(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


class UntestedKerasWarning(UserWarning):
    """The installed Keras is outside the versions this package is tested with."""


def check_keras_version(version):
    """Warns once when `version` is outside `TESTED_KERAS`.

    Args:
        version: the installed Keras's version string.

    Returns:
        True when the version is in the tested range.
    """
    low, high = TESTED_KERAS
    if _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
        return True
    warnings.warn(
        f"keras-strategies is tested with Keras >={low},<{high}, and this is Keras {version}. "
        "It patches Keras internals (keras_strategies.patches lists them), which may differ in "
        f"this version: install keras>={low},<{high}, or check your results carefully.",
        UntestedKerasWarning,
        stacklevel=3,
    )
    return False
