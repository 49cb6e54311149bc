"""One writer per checkpoint directory: a kernel lock (`fcntl.flock`) on DIR/.lock, recording who holds it.

The kernel releases the lock when its process dies, kill -9 included, so a crashed run never blocks the
next: its record stays in the lock file (a clean release clears it), naming a holder that is gone, and the
next writer takes it over with a note.
Readers (a sampling script, a restore-only Checkpointer) take no lock and change nothing.

Across hosts: flock on a network file system is only as good as that file system's lock support (NFSv4's
is real; some others lock per host only), and a holder on another host cannot be checked for liveness:
its host, pid and start time are shown so a person can decide. Do not share one --ckpt-dir between two
jobs whatever the file system.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class LockedError(RuntimeError):
    """Another live process holds the directory's lock."""


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive_here(holder: dict) -> bool | None:
    """Whether the holder's process still runs (None: on another host, which cannot be checked)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def describe(holder: dict) -> str:
    """'pid 123 on host h since 2026-12-04T10:00:00Z' (what is known of it)."""
    if not holder:
        return "an unknown process"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
    )


class DirectoryLock:
    """The exclusive lock of `directory` (created if missing), held until `release` or the process's end.

    `acquire` raises LockedError naming the holder when another process holds it; `note` says, after a
    successful acquire, whether a stale holder's record was taken over.
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.note: str | None = None
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            held = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(f"{self.path.parent} is being written by {describe(held)}") from None
        previous = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous and _alive_here(previous) is False:
            self.note = f"took over the lock of {describe(previous)}, whose process is gone"
        elif previous and _alive_here(previous) is None:
            self.note = f"took over the lock last held by {describe(previous)} (another host: not checked)"
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self):
        """Clear the record and unlock: a record found later names a holder that died holding the lock."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
