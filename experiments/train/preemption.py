"""submitit's checkpoint signal inside a job (time limit near, or preemption): deferred to a training-step boundary.

submitit's own handler (``USR2`` by default, ``SUBMITIT_PREEMPT_SIGNAL``) calls the job's ``checkpoint()``, requeues
the job and exits at once, wherever the main thread is, possibly halfway through an optimizer step. While
``deferred()`` is active (``train/fit.py``), the signal only sets a flag; the training loop asks ``requested()``
after every step, saves a consistent checkpoint, and calls ``hand_over()``, which runs submitit's handler (rank 0:
requeue, then exit; other ranks exit). Outside ``deferred()``, or outside a submitit job, nothing changes.

A signal that arrives after the last step's check is handed over when ``deferred()`` exits; the requeued job then
resumes from the checkpoint of the last epoch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Optional

from experiments.train import distributed
from experiments.train.distributed import DistEnv

log = logging.getLogger(__name__)


class Deferral:
    """The flag between the signal handler and the training loop, and submitit's handler to hand over to."""

    def __init__(self, signum: Optional[int] = None, original: Optional[Callable] = None) -> None:
        self.signum, self.original = signum, original
        self.flag = False
        self.handled = False

    @property
    def active(self) -> bool:
        return self.original is not None

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        if not self.flag:
            log.warning("caught %s: checkpointing at the end of this training step, then requeueing",
                        signal.Signals(signum).name)
        self.flag = True

    def requested(self, env: DistEnv = distributed.SINGLE) -> bool:
        """Whether any rank caught the signal (a collective when distributed and active: call it on all ranks)."""
        if not self.active:
            return False
        return distributed.any_true(self.flag, env) if env.enabled else self.flag

    def hand_over(self, env: DistEnv = distributed.SINGLE) -> None:
        """Run submitit's handler now that the checkpoint is on disk: rank 0 requeues the job and exits; other
        ranks exit (without a result, like submitit's rank 0)."""
        self.handled = True
        distributed.barrier(env)
        if env.is_main and callable(self.original):
            self.original(self.signum, None)  # requeues and raises SystemExit
        log.info("rank %d: leaving after the checkpoint; rank 0 requeues the job", env.rank)
        sys.exit(-1)


def _submitit_signal() -> Optional[tuple[int, Callable]]:
    """(signal, submitit's installed handler) when this process is a submitit job task, else None."""
    if os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    from submitit.core.job_environment import JobEnvironment

    signum = JobEnvironment._usr_sig()
    handler = signal.getsignal(signum)
    if not callable(handler):
        return None
    return signum, handler


@contextlib.contextmanager
def deferred() -> Iterator[Deferral]:
    """Defer submitit's checkpoint signal while the block runs (see the module docstring)."""
    found = _submitit_signal()
    if found is None:
        yield Deferral()
        return
    signum, original = found
    deferral = Deferral(signum, original)
    signal.signal(signum, deferral._on_signal)
    try:
        yield deferral
    finally:
        signal.signal(signum, original)
    if deferral.flag and not deferral.handled:  # only after a normal exit: a crash is not requeued
        log.warning("checkpoint signal arrived after the last step check: handing over to submitit now")
        deferral.handled = True
        original(signum, None)
