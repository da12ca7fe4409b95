"""Keras-style device names (`"cpu:0"`, `"gpu:1"`, `"tpu:0"`), and the CPU
cores this process may use, shared by every backend."""

import os
import re

from keras_strategies.errors import StrategyError

DEVICE_TYPES = ("cpu", "gpu", "tpu")
_PATTERN = re.compile(
    r"^/?(?:job:[^/]+/)?(?:replica:\d+/)?(?:task:\d+/)?(?:device:)?"
    r"(?P<type>[a-z]+)(?::(?P<index>\d+))?$"
)


def usable_cores():
    """The CPU cores this process may run on: its affinity where the system
    has one (`taskset`, a Slurm task's binding, a container's cpuset),
    else the machine's count.

    Returns:
        An int, at least 1.

    Example:
    >>> usable_cores() >= 1
    True
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_device(name):
    """Parses a device name into `(type, index)`.

    Args:
        name: a Keras-style name such as `"cpu:0"` or `"gpu:1"`. TensorFlow
            spellings (`"/device:GPU:0"`), `"cuda:0"` and a bare `"gpu"`
            (index 0) are accepted too.

    Returns:
        A tuple `(device_type, index)`, with `device_type` one of
        `"cpu"`, `"gpu"`, `"tpu"`.

    Example:
    >>> parse_device("/device:GPU:1")
    ('gpu', 1)
    """
    if not isinstance(name, str):
        raise StrategyError(
            f"Device names are strings such as 'cpu:0' or 'gpu:1'; got {name!r}."
        )
    match = _PATTERN.match(name.strip().lower())
    dtype = match.group("type") if match else None
    if dtype == "cuda":
        dtype = "gpu"
    if dtype not in DEVICE_TYPES:
        raise StrategyError(
            f"Unknown device {name!r}: use a name such as 'cpu:0', 'gpu:1' or "
            "'tpu:0'."
        )
    return dtype, int(match.group("index") or 0)


def normalize_device(name):
    """Returns the canonical Keras spelling of a device name, e.g. `"gpu:1"`."""
    dtype, index = parse_device(name)
    return f"{dtype}:{index}"


def normalize_devices(devices, strategy_name):
    """Normalises a list of device names and rejects duplicates and mixtures.

    Args:
        devices: an iterable of device names.
        strategy_name: used in error messages.

    Returns:
        A list of canonical names, in the given order.
    """
    if isinstance(devices, str):
        devices = [devices]
    names = [normalize_device(d) for d in devices]
    if not names:
        raise StrategyError(f"{strategy_name} needs at least one device; got [].")
    if len(set(names)) != len(names):
        raise StrategyError(
            f"{strategy_name}: each device may appear once; got {list(devices)}."
        )
    if len({parse_device(n)[0] for n in names}) > 1:
        raise StrategyError(
            f"{strategy_name}: all devices must be of one type (all 'cpu', all "
            f"'gpu' or all 'tpu'); got {names}."
        )
    return names


def check_available(names, available, strategy_name, backend, hint=""):
    """Raises a clear error when a device is not on this machine.

    Args:
        names: canonical device names that were asked for.
        available: canonical device names the backend sees.
        strategy_name: used in the message.
        backend: the Keras backend name, used in the message.
        hint: an optional sentence saying how to get more devices.
    """
    missing = [n for n in names if n not in available]
    if missing:
        message = (
            f"{strategy_name} on the {backend} backend: unknown device(s) "
            f"{missing}; this machine has {sorted(available)}."
        )
        if hint:
            message += " " + hint
        raise StrategyError(message)
