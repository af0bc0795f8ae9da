"""One writer per folder: an exclusive lock that names its holder and dies with it.

`fcntl.flock` on `<folder>/.bulkdet.lock`: the kernel releases it when the holder exits, however
it exits (kill -9 included), so a lock left by a dead process is simply taken by the next one.
The file also records who holds it (pid, host, start time, what), for the message a second
process gets. The file stays after release (removing it would race with a process that has just
opened it); it is bulkdet's own and holds nothing else.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".bulkdet.lock"


class FolderInUse(RuntimeError):
    """Another live bulkdet process writes this folder."""


class FolderLock:
    def __init__(self, folder: Path, what: str):
        self.path = Path(folder) / LOCK_NAME
        self.what = what  # "run" or "pack": said in the message of a second process
        self._file = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise FolderInUse(f"{self.path.parent} is in use by another bulkdet {holder}: wait for it to "
                              "finish (or stop it), or choose another folder") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"{h['what']} (pid {h['pid']} on {h['host']}, started {h['started']})"
    except (ValueError, KeyError, TypeError):
        return "process"
