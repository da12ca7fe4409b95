"""A model's training state and the step functions compiled for it."""

import contextlib


def state_variables(model):
    """Every variable a training step touches: model, optimizer and metrics.

    Args:
        model: a Keras model.

    Returns:
        A list of Keras variables without duplicates, in a stable order.
    """
    found, seen = [], set()
    groups = [model.variables, getattr(model, "metrics_variables", [])]
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        groups.append(optimizer.variables)
    for group in groups:
        for variable in group:
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


def batch_norms_with_keras_moments(model):
    """The BatchNormalization layers of `model` whose class keeps Keras's own
    `_moments`: those a strategy may give other (equal) statistics. A
    subclass with its own `_moments` is its author's business: left out.

    Args:
        model: a Keras model.

    Returns:
        A list of `keras.layers.BatchNormalization` layers.
    """
    from keras.src.layers.normalization.batch_normalization import BatchNormalization

    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, BatchNormalization) and type(layer)._moments is BatchNormalization._moments]


def reset_compiled_functions(model):
    """Drops the model's traced/jitted step functions so they are built anew."""
    model.train_function = None
    model.test_function = None
    model.predict_function = None


_STASH = "_ks_compiled_functions"


def _compiled_with(model, values):
    # What a compiled step bakes in: Keras's compile() replaces these objects
    # (and a step that creates state adds variables), so any change means the
    # stashed functions are stale. Compared by identity, the objects held.
    # `values`: the backend variables too, where a traced step captures them
    # (TensorFlow), so that re-created variables mean a new trace.
    variables = state_variables(model)
    return [getattr(model, "optimizer", None), getattr(model, "_compile_loss", None),
            getattr(model, "_compile_metrics", None), *variables,
            *([v._value for v in variables] if values else [])]


def stash_compiled_functions(model, owner, values=False):
    """Keeps the step functions compiled under `owner` for its next run of the
    model, and leaves the model without them (plain Keras builds its own).

    Args:
        model: the Keras model, after a fit/evaluate/predict under `owner`.
        owner: the implementation that compiled them.
        values: whether the functions captured the backend variables
            (TensorFlow's traced steps do; JAX's take them as arguments).
    """
    model.__dict__[_STASH] = (owner, _compiled_with(model, values),
                              (model.train_function, model.test_function, model.predict_function))
    reset_compiled_functions(model)


def restore_compiled_functions(model, owner, values=False):
    """The step functions `owner` compiled for this model in an earlier
    fit/evaluate/predict, so that calling them again does not compile again;
    none when another strategy compiled them or the model was compiled anew
    (or, with `values`, its variables were re-created) since.

    Args:
        model: the Keras model, before a fit/evaluate/predict under `owner`.
        owner: the implementation about to run it.
        values: as given to `stash_compiled_functions`.

    Returns:
        True if the functions were restored.
    """
    stash = model.__dict__.pop(_STASH, None)
    if stash is not None and stash[0] is owner:
        before, now = stash[1], _compiled_with(model, values)
        if len(before) == len(now) and all(a is b for a, b in zip(before, now)):
            model.train_function, model.test_function, model.predict_function = stash[2]
            return True
    reset_compiled_functions(model)
    return False


_PREDICT = "_ks_predict_functions"


@contextlib.contextmanager
def cached_predict_function(model, key, values=False):
    """Around a `predict` that compiles its own predict function (a split
    predict on one worker's devices): the one compiled for `key` in an
    earlier call is used again while the model's compiled state is the same,
    and the model's own predict function is put back after.

    Args:
        model: the Keras model.
        key: what the function was compiled for (an implementation).
        values: as for `stash_compiled_functions`.
    """
    cache = model.__dict__.setdefault(_PREDICT, {})
    saved = model.predict_function
    kept = cache.pop(id(key), None)
    now = _compiled_with(model, values)
    same = (kept is not None and kept[0] is key and len(kept[1]) == len(now)
            and all(a is b for a, b in zip(kept[1], now)))
    model.predict_function = kept[2] if same else None
    try:
        yield
    finally:
        cache[id(key)] = (key, _compiled_with(model, values), model.predict_function)
        model.predict_function = saved
