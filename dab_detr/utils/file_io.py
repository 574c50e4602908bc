"""Writing files so that a crash or a kill never leaves a half-written one behind."""

import glob
import os
import tempfile
from typing import BinaryIO, Callable, List, Union

__all__ = ["atomic_write", "remove_stale_temporaries"]

_TMP_PREFIX = ".tmp_"


def atomic_write(
    path: str, content: Union[bytes, Callable[[BinaryIO], object]], fsync: bool = True
) -> None:
    """Write ``content`` (bytes, or a function writing to a binary file) to a temporary file
    beside ``path``, flush it to disk (unless ``fsync`` is False: a cache that can be
    regenerated), then rename it to ``path``.

    The file gets the usual permissions (0o666 minus the umask), not ``mkstemp``'s private
    0o600, so that checkpoints stay readable by whoever could read them before. The temporary
    file is ``.tmp_<name of path>.<random>``: a process killed mid-write leaves it behind, and
    :func:`remove_stale_temporaries` removes it.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{_TMP_PREFIX}{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, which
    would race with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def remove_stale_temporaries(folder: str, pattern: str) -> List[str]:
    """Remove the temporary files that writes of ``folder/<pattern>`` killed mid-write left
    behind (``pattern`` is a glob of the final names, e.g. ``"*.pth"``).

    Only call it where no other process can be writing such a file at the same time (e.g. the
    main process of a training job, for its own checkpoints): it cannot tell a leftover from a
    write in progress.

    Returns:
        The paths removed.
    """
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), f"{_TMP_PREFIX}{pattern}.*")):
        try:
            os.remove(tmp)
        except FileNotFoundError:
            continue
        removed.append(tmp)
    return removed
