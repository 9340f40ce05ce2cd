"""Files written whole or not at all: checkpoints, exports, tokenizers."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator

# atomic_output's temporary files: .<name>.<writer's pid>.<8 hex digits>.tmp (Linux pids have at most 7 digits).
_TEMPORARY = re.compile(r"\..+\.(?P<pid>[0-9]{1,7})\.[0-9a-f]{8}\.tmp")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write; when the block ends without error it becomes ``path``.

    The temporary file lives in the destination directory so the final step is a same-filesystem
    rename; it is fsynced first, and the directory after, so a crash or a SIGKILL at any moment
    leaves either the old file or the complete new one. On an error it is removed and ``path`` is
    untouched. It is created with the permissions of any new file under the umask (``mkstemp``'s
    would make a checkpoint readable by its owner only, on a cluster the team shares). A process
    killed mid-write leaves the temporary file behind; :func:`remove_stale_temporaries` removes it.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield tmp
        # Some writers replace the file rather than write into it (safetensors' save_file makes it 0600).
        if os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
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


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Removes the temporary files that killed writers of :func:`atomic_output` left in ``directory``.

    A file counts as stale when the process named in it (its pid) no longer exists on this machine;
    the files of live processes, this one included, stay. So no process on another machine may be
    writing into ``directory`` meanwhile: a run directory has one writer, its global rank 0.

    Returns:
        The paths removed, sorted; none when ``directory`` does not exist.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.fullmatch(name)
        if match is not None and not _process_exists(int(match["pid"])):
            path = os.path.join(directory, name)
            os.unlink(path)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
