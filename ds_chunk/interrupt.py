"""Ctrl-C and SIGTERM (a preempted spot job, a cluster scheduler's time limit) end a run cleanly.

    with StopOnSignal() as stop:
        for step in ...:
            train_step(...)
            if stop.agreed():      # every rank sees the same answer (one all-reduce)
                save(step)
                raise Interrupted(stop.signum, step, checkpoint)

The first SIGINT / SIGTERM only asks: the step under way finishes, the loop saves a
checkpoint and exits with 128 + the signal's number. A second signal ends the process at
once, with the default action. Launchers (torchrun, deepspeed, accelerate) pass both
signals to every rank, but not always between the same two steps: ``agreed`` makes every
rank stop after the same step, so DeepSpeed's collective save cannot hang.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Inside the block, SIGINT / SIGTERM set ``received`` instead of ending the process."""

    def __init__(self, message: str = "finishing the step under way, then saving a checkpoint"):
        self.message = message
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # the second: at once, as if we were not here
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        name = signal.Signals(signum).name
        print(f"\nds_chunk: {name}: {self.message} ({name} again exits at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSignal:
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, device: torch.device | None = None) -> bool:
        """Whether any rank received a signal (all ranks must call this after the same step)."""
        flag = self.received is not None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            t = torch.tensor(float(flag), device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t > 0)
        return flag

    @property
    def signum(self) -> int:
        """The signal received here, or SIGTERM for a rank told by another."""
        return self.received or signal.SIGTERM


class Interrupted(Exception):
    """The run stopped on a signal after ``step``, with a checkpoint there (``checkpoint``)."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports it
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")
