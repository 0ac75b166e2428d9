"""One process at a time per resume folder: an exclusive ``flock`` that a run holds from the moment it starts
preparing until its record is written and its resume state cleared.

Two identical commands share one resume folder (``paths.state_dir/<run key>``): both would fine-tune into the
same ``last.pth`` at once. The lock file sits beside the folder (``<run key>.lock``), not inside it, so clearing
the folder never races with it. The second command is refused at once, naming the lock, instead of waiting:
when the first finishes it clears the resume state, and a waiting twin would then train the same run again.
``flock`` locks are released by the kernel when the process dies, so a killed run never leaves a stale lock.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

from experiments.config import ConfigError


class RunLockedError(ConfigError):
    """Another live process holds the resume folder of this configuration; the message names the lock file."""


class RunLock:
    """Exclusive, non-blocking ``flock`` on ``<resume_dir>.lock``; a no-op for runs without a resume folder."""

    def __init__(self, resume_dir: Optional[Path]) -> None:
        self.path = Path(f"{resume_dir}.lock") if resume_dir is not None else None
        self._handle = None

    def acquire(self) -> "RunLock":
        if self.path is None or self._handle is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunLockedError(
                f"paths.state_dir: {self.path} is locked by another process running the same configuration "
                f"(its resume folder is {self.path.with_suffix('')}); valid: wait for it to finish, or give this "
                "run another paths.state_dir") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")  # who holds it, for a person looking (the flock is what counts)
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
