"""A backup directory that is never left half-written.

Each backup is a directory `backup-<batches>` (the number of training
batches done, zero-padded so names sort in order) holding Keras's
`model.weights.h5` (the model's and the optimizer's variables: a format
every backend reads) and `state.json` (epoch, step, seed, ...). It is
written into a hidden temporary directory, flushed to disk (fsync), and
only then renamed into place; the previous backup is kept, so a process
killed at any moment leaves the last complete backup readable.
"""

import json
import os
import shutil
import uuid

WEIGHTS = "model.weights.h5"
STATE = "state.json"
PREFIX = "backup-"
KEEP = 2  # the newest backup and the one before it


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(backup_dir, batches, save_weights, state):
    """Writes one backup atomically and prunes the older ones.

    Args:
        backup_dir: the user's backup directory (created if missing).
        batches: training batches done; names the backup.
        save_weights: `save_weights(path)` writes the `.weights.h5` file.
        state: the JSON-serializable training state.

    Returns:
        The backup's final path.
    """
    os.makedirs(backup_dir, exist_ok=True)
    temporary = os.path.join(backup_dir, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(temporary)
    try:
        save_weights(os.path.join(temporary, WEIGHTS))
        with open(os.path.join(temporary, STATE), "w") as f:
            json.dump(state, f)
        for name in (WEIGHTS, STATE):
            _fsync(os.path.join(temporary, name))
        _fsync(temporary, directory=True)
        final = os.path.join(backup_dir, f"{PREFIX}{batches:012d}")
        if os.path.exists(final):  # the same step again (its epoch's end): replaced
            shutil.rmtree(final)
        os.rename(temporary, final)
        _fsync(backup_dir, directory=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in backups(backup_dir)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def backups(backup_dir):
    """The complete backups in `backup_dir`, newest first (paths)."""
    if not os.path.isdir(backup_dir):
        return []
    names = sorted((n for n in os.listdir(backup_dir) if n.startswith(PREFIX)), reverse=True)
    return [os.path.join(backup_dir, n) for n in names]


def read_state(path):
    """The `state.json` of the backup at `path` (raises `OSError` or
    `ValueError` when it is missing or unreadable)."""
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def weights_path(path):
    """The weights file of the backup at `path`."""
    return os.path.join(path, WEIGHTS)


def remove_leftovers(backup_dir):
    """Removes temporary directories of writers that were killed."""
    if os.path.isdir(backup_dir):
        for name in os.listdir(backup_dir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(backup_dir, name), ignore_errors=True)
