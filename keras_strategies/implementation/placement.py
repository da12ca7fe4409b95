"""Where CentralStorage keeps its variables, and the TPU checks, shared by
every backend."""

from keras_strategies.devices import check_available, normalize_device, parse_device


def storage_device_for(devices, storage_device):
    """The storage device a CentralStorage over `devices` uses.

    Args:
        devices: the resolved compute devices (canonical Keras names).
        storage_device: what the user asked for, or `None`.

    Returns:
        A canonical Keras device name: the one asked for; else the single
        compute device when it is an accelerator; else `"cpu:0"`.
    """
    if storage_device is not None:
        return normalize_device(storage_device)
    if len(devices) == 1 and parse_device(devices[0])[0] != "cpu":
        return devices[0]
    return "cpu:0"


def resolve_storage_device(implementation, storage_device, cpu_devices, cpu_hint=""):
    """The checked storage device of a CentralStorage implementation.

    Args:
        implementation: the backend's implementation (its `devices` resolved).
        storage_device: what the user asked for, or `None`.
        cpu_devices: the CPU devices the backend has (canonical names).
        cpu_hint: a sentence added to the error for an unknown CPU.

    Returns:
        A canonical Keras device name.

    Raises:
        StrategyError: the device is not on this machine, or is an
            accelerator that is not one of the compute devices.
    """
    storage = storage_device_for(implementation.devices, storage_device)
    if parse_device(storage)[0] == "cpu":
        available, hint = cpu_devices, cpu_hint
    else:
        available = implementation.devices
        hint = "An accelerator used for storage must be one of the compute devices."
    check_available([storage], available, implementation.name, implementation.backend, hint)
    return storage


def check_local_tpu(implementation, tpu, engine, fix):
    """JAX and torch_xla use this host's TPU: a TPU name or address is refused.

    Args:
        implementation: the backend's implementation.
        tpu: what the user passed as `TPU(tpu=...)`.
        engine: `"JAX"` or `"torch_xla"`.
        fix: the sentence saying what to do instead.
    """
    if tpu not in (None, "local"):
        raise implementation.unsupported(
            f"a TPU name or address ({tpu!r}) is a TensorFlow TPUClusterResolver setting; "
            f"{engine} uses this host's TPU devices",
            fix,
        )
