"""Files written whole or not at all: checkpoints, exports, tokenizers."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write; when the block ends without error it becomes ``path``.

    The temporary file lives in the destination directory so the final step is a same-filesystem
    rename; it is fsynced first, and the directory after, so a crash or a SIGKILL at any moment
    leaves either the old file or the complete new one. On an error it is removed and ``path`` is
    untouched. It is created with the permissions of any new file under the umask (``mkstemp``'s
    would make a checkpoint readable by its owner only, on a cluster the team shares).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
