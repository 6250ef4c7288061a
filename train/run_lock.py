"""One run per output directory: an exclusive `fcntl.flock` on OUTPUT_DIR/.lock, held for the life of the run.

Two runs writing one directory destroy each other (each save removes the other's half-written checkpoint, the
second logger replaces metrics.jsonl under the first). The lock is taken before anything is read or written;
a second run fails at once, naming the holder. The kernel releases a flock when its holder exits or is killed,
so a stale lock file never blocks a rerun. The file's contents (pid, host, start time) are only for the message.

flock is advisory and per open file description; it works on local file systems (and NFSv4 emulates it).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunLockError(RuntimeError):
    """The output directory is in use by another run, or cannot be created or written."""


class RunLock:
    """`with RunLock(output_dir):` or `lock = RunLock(output_dir).acquire(); ...; lock.release()`."""

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # O_CLOEXEC (os.open's default): a child process must not inherit, and so keep, the lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunLockError(f"output directory {self.dir}: cannot be created or written ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockError(f"{self.path}: cannot lock ({e.strerror})") from None
            raise RunLockError(f"output directory {self.dir} is in use by another run ({self._holder()}); "
                               "wait for it to finish, stop it, or choose another --output-dir") from None
        try:  # who holds it, for the message of a second run
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError as e:  # e.g. a full disk: the lock is held all the same
            os.close(fd)
            raise RunLockError(f"{self.path}: cannot be written ({e.strerror})") from None
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            who = json.loads(self.path.read_text())
            return f"pid {who['pid']} on host {who['host']}, since {who['since']}; lock file {self.path}"
        except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its name yet
            return f"lock file {self.path}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
