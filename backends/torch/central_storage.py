"""PyTorch CentralStorage: master parameters on a storage device, replicas on
the compute devices, in one process (as `torch.nn.DataParallel`).

Per step (fit, evaluate and predict alike):

1. The model's own variables are the master copy; they and the optimizer
   state stay on the storage device.
2. When Keras calls the model on a batch, the batch is split over the compute
   devices, and each replica gets its own copy of every variable on its
   device: `master.to(device)` (or `master.clone()` on the same device), which
   autograd tracks, so the backward pass sums each replica's gradient into
   the master parameter's `.grad` -- the reduction into the master copy.
3. The replicas run concurrently, one thread each, on their slices; a
   BatchNormalization layer all-reduces its batch sums over the replicas, so
   its statistics are those of the global batch, as under Mirrored. The new
   moving statistics (identical on every replica) are averaged into the master.
4. The outputs are gathered on the storage device, where Keras computes the
   loss and metrics and the optimizer updates the master parameters.

The model's (or the user's) `train_step` is unchanged: only the model's `call`
is replicated, for the duration of each run. Losses added with `add_loss`
inside `call` (activity regularizers) are not collected from the replicas.
"""

import contextlib
import threading

import keras
import torch
from keras.src.backend.common.stateless_scope import StatelessScope, in_stateless_scope
from keras.src.backend.torch import core as torch_core

from keras_strategies.backends.torch.base import TorchImplementation, move_variables, torch_device
from keras_strategies.implementation.placement import resolve_storage_device
from keras_strategies.patches import overriding

# -- BatchNormalization statistics over the replicas of one step -------------
_replica = threading.local()  # .group and .index inside a replica's thread


class _ReplicaGroup:
    """The replicas of one forward pass: an all-reduce (sum) between threads."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size

    def all_sum(self, index, tensor):
        self.slots[index] = tensor
        self.barrier.wait()
        total = sum(t.to(tensor.device) for t in self.slots)  # keeps autograd
        self.barrier.wait()  # everyone has read before the slots are reused
        return total


def replica_group_moments(original):
    """The factory of the `torch-replica-batchnorm` patch:
    `BatchNormalization._moments` over every replica of the step."""

    def moments(layer, inputs, mask):
        group = getattr(_replica, "group", None)
        if group is None or group.size == 1 or mask is not None:
            return original(layer, inputs, mask)
        return _group_moments(layer, inputs, group)

    return moments


def _group_moments(layer, inputs, group):
    x = inputs.float() if inputs.dtype == torch.float16 else inputs
    axes = list(layer._reduction_axes)
    count = torch.tensor(float(x.numel() // x.shape[layer.axis]), device=x.device)
    sums = torch.cat(
        [count.reshape(1), x.sum(dim=axes), torch.square(x).sum(dim=axes)]
    )
    sums = group.all_sum(_replica.index, sums)
    total, features = sums[0], (sums.shape[0] - 1) // 2
    mean = sums[1 : 1 + features] / total
    variance = sums[1 + features :] / total - torch.square(mean)  # as Keras's torch moments
    return mean.to(inputs.dtype), variance.to(inputs.dtype)


# -- the strategy ------------------------------------------------------------
class TorchCentralStorage(TorchImplementation):
    """Master parameters on the storage device, one replica per compute device."""

    keras_patches = ("torch-replica-batchnorm", "torch-copy-free-layouts")

    def __init__(self, strategy, devices, storage_device=None):
        super().__init__(strategy, devices)
        self.storage_device = resolve_storage_device(
            self, storage_device, ["cpu:0"], "PyTorch has one CPU device, 'cpu:0'.")
        self.native = torch_device(self.storage_device)
        self.replica_devices = [torch_device(d) for d in self.devices]
        self.last_step = None  # what the last replicated call did (for tests)

    def default_devices(self):
        return [f"gpu:{i}" for i in range(torch.cuda.device_count())] or ["cpu:0"]

    def available_devices(self, kind, requested):
        if kind == "cpu":  # replicas on the one CPU device, each its own copy
            return list(requested), ""
        return super().available_devices(kind, requested)

    @contextlib.contextmanager
    def run_context(self, model):
        move_variables(model, self.native)
        with overriding(model, "call", self._replicated_call(model), "torch-replicated-call"), self.scope():
            yield

    def _replicated_call(self, model):
        call = type(model).call

        def replicated(inputs, *args, **kwargs):
            leaves = keras.tree.flatten(inputs)
            if (
                in_stateless_scope()
                or not leaves
                or not all(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in leaves)
            ):
                return call(model, inputs, *args, **kwargs)  # symbolic or stateless use
            shards = [torch.tensor_split(leaf, len(self.replica_devices)) for leaf in leaves]
            work = [
                (device, keras.tree.pack_sequence_as(inputs, [s[i] for s in shards]))
                for i, device in enumerate(self.replica_devices)
                if shards[0][i].shape[0] > 0
            ]
            group = _ReplicaGroup(len(work))
            grad = torch.is_grad_enabled()
            results, errors = [None] * len(work), []

            def run(index, device, x):
                _replica.group, _replica.index = group, index
                try:
                    with torch.set_grad_enabled(grad), torch_core.device_scope(str(device)):
                        results[index] = self._run_replica(model, call, device, x, args, kwargs)
                except BaseException as error:  # noqa: BLE001 -- re-raised below
                    errors.append(error)
                    group.barrier.abort()
                finally:
                    _replica.group = None

            threads = [
                threading.Thread(target=run, args=(i, device, x), daemon=True)
                for i, (device, x) in enumerate(work)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            self._store_non_trainable(model, [r[1] for r in results])
            self.last_step = {
                "devices": [str(device) for device, _ in work],
                "batch_sizes": [keras.tree.flatten(x)[0].shape[0] for _, x in work],
                "copies": [r[2] for r in results],
            }
            outputs = [r[0] for r in results]
            return keras.tree.map_structure(
                lambda *parts: torch.cat([p.to(self.native) for p in parts]), *outputs
            )

        return replicated

    @staticmethod
    def _run_replica(model, call, device, x, args, kwargs):
        x = keras.tree.map_structure(lambda t: t.to(device), x)
        mapping = []
        for variable in model.trainable_variables:
            value = variable.value
            mapping.append((variable, value.to(device) if value.device != device else value.clone()))
        for variable in model.non_trainable_variables:
            mapping.append((variable, variable.value.detach().to(device, copy=True)))
        with StatelessScope(state_mapping=mapping) as scope:
            outputs = call(model, x, *args, **kwargs)
        updates = [scope.get_current_value(v) for v in model.non_trainable_variables]
        copies = {v.path: (str(c.device), c.data_ptr()) for v, c in mapping}
        return outputs, updates, copies

    def _store_non_trainable(self, model, per_replica):
        with torch.no_grad():
            for variable, values in zip(model.non_trainable_variables, zip(*per_replica)):
                values = [v.detach().to(self.native) for v in values if v is not None]
                if not values:
                    continue
                if values[0].is_floating_point():
                    variable.assign(sum(values) / len(values))  # MEAN, as on TensorFlow
                else:
                    variable.assign(values[0])


IMPLEMENTATIONS = {"CentralStorage": TorchCentralStorage}
