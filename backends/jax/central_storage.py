"""JAX CentralStorage: variables on one storage device, the batch sharded over
the compute devices.

What moves per training step:

1. storage -> every compute device: the model's trainable and non-trainable
   variables and the metric variables, and the optimizer's scalar variables
   (iteration count, learning rate, loss scale). The optimizer's slot
   variables (momenta, ...) never leave the storage device.
2. host -> compute devices: the batch, sharded over them (a batch that cannot
   be split evenly is replicated, as under Mirrored).
3. On the compute devices the model's own `train_step` runs forward and
   backward; XLA sums the gradients over the replicas, and BatchNormalization
   sees the global batch.
4. compute devices -> storage: the summed gradients and the new
   non-trainable and metric values. The optimizer update then runs on the
   storage device, where the updated variables stay for the next step.

evaluate and predict do steps 1-3 without gradients; predict returns only
the outputs. Between steps every variable lives on the storage device.
"""

import contextlib

import jax
import jax.numpy as jnp
import keras
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from keras_strategies.backends.jax.base import (
    JaxImplementation,
    accelerators,
    global_moments_in_one_pass,
    steps_in_flight_bounded,
)
from keras_strategies.backends.jax.keras_fixes import unaliased_ema
from keras_strategies.errors import StrategyError
from keras_strategies.implementation.model_state import reset_compiled_functions, state_variables
from keras_strategies.implementation.placement import resolve_storage_device
from keras_strategies.devices import parse_device
from keras_strategies.patches import overriding

_FUNCTIONS = ("make_train_function", "make_test_function", "make_predict_function")


def jax_device(name):
    """The `jax.Device` for a Keras-style device name."""
    kind, index = parse_device(name)
    return jax.devices(kind)[index]


class _CentralStorageDistribution(keras.distribution.DataParallel):
    """DataParallel over the compute devices whose variables are created on
    the storage device instead of replicated on the mesh."""

    def __init__(self, devices, storage):
        super().__init__(devices=devices)
        self.storage_sharding = NamedSharding(Mesh([storage], ("storage",)), PartitionSpec())

    def get_variable_layout(self, variable):
        return self.storage_sharding


class JaxCentralStorage(JaxImplementation):
    """Variables on the storage device, the batch sharded over the compute devices."""

    def default_devices(self):
        """Every GPU or TPU device, else the first device, as `Mirrored`."""
        return accelerators() or JaxImplementation.default_devices(self)

    def __init__(self, strategy, devices, storage_device=None):
        self._storage_request = storage_device
        super().__init__(strategy, devices)
        mesh = self.native.device_mesh.backend_mesh
        self.replicated = NamedSharding(mesh, PartitionSpec())

    def make_distribution(self):
        cpus = keras.distribution.list_devices("cpu")
        self.storage_device = resolve_storage_device(self, self._storage_request, cpus)
        self.storage = jax_device(self.storage_device)
        return _CentralStorageDistribution(self.devices, self.storage)

    # -- placement -------------------------------------------------------------
    def attach(self, model):
        for variable in state_variables(model):
            variable._layout = self.native.storage_sharding
            if variable._value is not None:
                variable._value = jax.device_put(variable._value, self.storage)
        reset_compiled_functions(model)

    @contextlib.contextmanager
    def run_context(self, model):
        makers = {
            "make_train_function": self._make_train_function,
            "make_test_function": self._make_test_function,
            "make_predict_function": self._make_predict_function,
        }
        reset_compiled_functions(model)
        try:
            with contextlib.ExitStack() as stack:
                for name, make in makers.items():
                    stack.enter_context(overriding(
                        model, name, _maker(model, name, make), "jax-central-storage-steps"))
                stack.enter_context(self.scope())
                stack.enter_context(unaliased_ema(model))
                stack.enter_context(steps_in_flight_bounded(model, self.devices))
                stack.enter_context(global_moments_in_one_pass(model, self.num_replicas_in_sync))
                yield
        finally:
            reset_compiled_functions(model)

    # -- steps -------------------------------------------------------------------
    def _to_compute(self, tree):
        return jax.device_put(tree, self.replicated)

    def _to_storage(self, tree):
        return jax.device_put(tree, self.storage)

    def _make_train_function(self, model):
        optimizer = model.optimizer
        shapes = [(v.shape, v.dtype) for v in optimizer.variables]

        def on_compute(trainable, non_trainable, scalars, metrics, data):
            optimizer_values = [
                value if value is not None else jnp.zeros(shape, dtype)
                for value, (shape, dtype) in zip(scalars, shapes)
            ]
            captured = []

            def capture(optimizer_variables, grads, trainable_variables):
                captured.append(grads)
                return trainable_variables, optimizer_variables

            with overriding(optimizer, "stateless_apply", capture, "jax-central-storage-steps"):
                logs, state = model.train_step(
                    (trainable, non_trainable, optimizer_values, metrics), data
                )
            if len(captured) != 1:
                raise StrategyError(
                    "CentralStorage on the jax backend needs train_step to call "
                    "optimizer.stateless_apply once per step (Keras's own "
                    f"train_step does); it was called {len(captured)} times."
                )
            return logs, state[1], state[3], captured[0]

        compute = jax.jit(on_compute)
        apply = jax.jit(optimizer.stateless_apply)

        def step(state, data):
            trainable, non_trainable, optimizer_values, metrics = state
            scalars = [v if v.ndim == 0 else None for v in optimizer_values]
            moved = self._to_compute((trainable, non_trainable, scalars, metrics))
            logs, non_trainable, metrics, grads = compute(*moved, data)
            grads, non_trainable, metrics = self._to_storage(
                (grads, non_trainable, metrics)
            )
            trainable, optimizer_values = apply(optimizer_values, grads, trainable)
            return logs, (trainable, non_trainable, optimizer_values, metrics)

        return step

    def _make_test_function(self, model):
        compute = jax.jit(model.test_step)

        def step(state, data):
            logs, state = compute(self._to_compute(state), data)
            return logs, self._to_storage(state)

        return step

    def _make_predict_function(self, model):
        compute = jax.jit(model.predict_step)

        def step(state, data):
            outputs, non_trainable = compute(self._to_compute(state), data)
            return outputs, (state[0], self._to_storage(non_trainable))

        return step


def _maker(model, name, make):
    """A per-model `make_*_function` that builds a central-storage step."""
    attribute = name.replace("make_", "")

    def make_function(force=False):
        if getattr(model, attribute) is not None and not force:
            return getattr(model, attribute)
        concatenate = attribute == "predict_function"
        step = model._make_function(make(model), concatenate_outputs=concatenate)
        setattr(model, attribute, step)
        return getattr(model, attribute)

    return make_function


IMPLEMENTATIONS = {"CentralStorage": JaxCentralStorage}
