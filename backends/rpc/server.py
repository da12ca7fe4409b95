"""A parameter server: its share of the variables, an optimizer for them, and
the updates it applies as they arrive.

The chief gives each server its share at the start of every `fit` (variable
`i` of the synchronised list goes to server `i % servers`, round robin), with
the optimizer's config and its state; the server builds the model's own Keras
optimizer over its share (each optimizer slot lives with its variable). A
worker reads (`pull`) and later sends its gradients (`push`); each update is
applied once, under a lock, in arrival order: a step id that was applied
already (a worker given up for lost that pushes late) is not applied again.
"""

import threading

import keras

from keras_strategies.backends.rpc.group import to_wire

_server = [None]  # this process's VariableServer


class VariableServer:
    """The variables and optimizer of one parameter server.

    Args:
        backend: the ParameterServer implementation of this process: its
            `from_wire(tensor)` and `apply(optimizer, grads, variables)`.
    """

    def __init__(self, backend):
        self.backend = backend
        self.lock = threading.Lock()
        self.variables = {}  # index in the synchronised list -> Keras variable
        self.optimizer = None
        self.version = 0  # updates applied since the job started
        self.applied = set()  # step ids applied

    def setup(self, specs, optimizer_config):
        """Takes this server's share: `specs` is a list of
        `(index, path, trainable, value)`. Returns the names of the
        optimizer's variables, for the chief to send their values."""
        with self.lock:
            self.variables = {
                index: keras.Variable(self.backend.from_wire(value), trainable=trainable,
                                      name=path.replace("/", "_"))
                for index, path, trainable, value in specs
            }
            self.paths = {index: path for index, path, _, _ in specs}
            self.optimizer = keras.optimizers.deserialize(optimizer_config)
            self.optimizer.build(self._trainable())
            return [v.name for v in self.optimizer.variables]

    def load(self, values):
        """Assigns optimizer variables by name (the chief's state)."""
        with self.lock:
            for variable in self.optimizer.variables:
                if variable.name in values:
                    variable.assign(self.backend.from_wire(values[variable.name]))

    def _trainable(self):
        return [v for _, v in sorted(self.variables.items()) if v.trainable]

    def pull(self):
        """`(version, {index: value})`: the current values, to compute against."""
        with self.lock:
            return self.version, {i: to_wire(v.value) for i, v in self.variables.items()}

    def push(self, step_id, read_version, gradients, values):
        """Applies one update; returns its staleness, or `None` for a step
        applied already.

        Args:
            step_id: the update's id.
            read_version: `version` when the worker pulled.
            gradients: `{index: gradient}` of this server's trainable variables.
            values: `{index: value}` of its non-trainable variables (the
                worker's new BatchNormalization statistics): assigned.
        """
        with self.lock:
            if step_id in self.applied:
                return None
            self.applied.add(step_id)
            trainable = self._trainable()
            by_variable = {id(self.variables[i]): g for i, g in gradients.items()}
            grads = [self.backend.from_wire(by_variable[id(v)]) for v in trainable]
            self.backend.apply(self.optimizer, grads, trainable)
            for index, value in values.items():
                self.variables[index].assign(self.backend.from_wire(value))
            staleness = self.version - read_version
            self.version += 1
            return staleness

    def state(self):
        """Every value: `(variables {index: value}, optimizer {name: value}, version)`."""
        with self.lock:
            return ({i: to_wire(v.value) for i, v in self.variables.items()},
                    {v.name: to_wire(v.value) for v in self.optimizer.variables}, self.version)

    def holdings(self):
        """The paths (the chief's) of the variables this server holds."""
        with self.lock:
            return [self.paths[index] for index in sorted(self.variables)]


# -- what the other processes call (module functions: RPC pickles them by name)
def setup(specs, optimizer_config):
    return _server[0].setup(specs, optimizer_config)


def load(values):
    return _server[0].load(values)


def pull():
    return _server[0].pull()


def push(step_id, read_version, gradients, values):
    return _server[0].push(step_id, read_version, gradients, values)


def state():
    return _server[0].state()


def holdings():
    return _server[0].holdings()


def updates():
    return _server[0].version
