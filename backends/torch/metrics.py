"""Metrics of a multi-process PyTorch run: results from the state (totals and
counts) summed over every worker, so every worker logs the global values."""

import math

import torch
import torch.distributed as dist
from keras.src.backend.torch.core import to_torch_dtype


def reduced_metric_variables(model):
    """The metric variables that are summed (or averaged) over workers."""
    return [v for v in model.metrics_variables if v.aggregation in ("sum", "mean")]


def flat_metric_state(variables, dtype):
    """Every variable's value in one flat tensor."""
    return torch.cat([v.value.detach().reshape(-1).to(dtype) for v in variables])


def metric_versions(variables):
    """In-place updates bump a tensor's version: the same on every worker,
    since every worker runs the same updates (NaN-safe, unlike values)."""
    return tuple(v.value._version for v in variables)


def global_metrics(model, get_metrics_result, step, world_size):
    """`model.get_metrics_result` computed from the state summed over workers.

    Args:
        model: the Keras model.
        get_metrics_result: the model's own method.
        step: the `ddp.DataParallelStep`; its `metric_cache` holds the state
            already reduced in this step's gradient all-reduce, if any.
        world_size: the number of workers (for MEAN-aggregated variables).

    Returns:
        The replacement method.
    """

    def result():
        variables = reduced_metric_variables(model)
        if not variables:
            return get_metrics_result()
        cache, step.metric_cache = step.metric_cache, None
        if cache is not None and cache[0] == metric_versions(variables):
            flat = cache[1]  # reduced in this step's gradient all-reduce
            step.metric_cache = cache
        else:
            flat = flat_metric_state(variables, torch.float64)
            dist.all_reduce(flat)
        # the results are computed from the global state, which stands in
        # for each variable's own tensor (swapped, not copied) meanwhile
        local = [v._value for v in variables]
        offset = 0
        try:
            for variable in variables:
                shape = tuple(variable.shape)
                size = math.prod(shape)
                total = flat[offset:offset + size].reshape(shape)
                offset += size
                if variable.aggregation == "mean":
                    total = total / world_size
                variable._value = total.to(to_torch_dtype(variable.dtype))
            return get_metrics_result()
        finally:
            for variable, value in zip(variables, local):
                variable._value = value

    return result
