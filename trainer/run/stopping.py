"""Stop signals (SIGTERM from the UI's Stop, Ctrl-C) inside `lora-workbench train`, from its first line on.

The handler goes in before the config, the data or the model load, and this module imports nothing heavy, so a
Stop that comes while the run is still starting is a stop (state `stopped`, exit 128 + the signal), not a kill.
Before training begins it ends the run at the next check; once training runs, after the current step
(callbacks.StopSignal), saving the adapter. A second signal stops at once, without saving.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

from trainer.run.launch import inside_launch

DUPLICATE_SIGNAL_S = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
BEFORE_TRAINING = "stopped before training began: no adapter saved"


class RunStopped(Exception):
    """A stop signal arrived before training started."""


class SignalOnce:
    """Tells a rank's repeated stop signal from the copy its launcher passes on.

    A rank gets SIGTERM/SIGINT from its process group (the UI's Stop, Ctrl-C) and again from torch.distributed.run,
    which forwards what it receives; the copy arriving within DUPLICATE_SIGNAL_S must not count as "stop now"."""

    def __init__(self):
        self.first: tuple[int, float] | None = None

    def is_copy(self, signum: int) -> bool:
        now = time.monotonic()
        if self.first is None:
            self.first = (signum, now)
            return False
        return self.first[0] == signum and now - self.first[1] < DUPLICATE_SIGNAL_S


class StopRequest:
    """The stop signal this run has received, if any; `training` is set once the Trainer's loop begins."""

    def __init__(self):
        self.signum: int | None = None
        self.training = False
        self.interrupted_twice = False
        self.unsaid: str | None = None
        self.signals = SignalOnce()

    def on_signal(self, signum: int, _frame: Any) -> None:
        if self.signals.is_copy(signum) and inside_launch():  # the launcher passing on the one we already got
            return
        if self.signum is not None:  # a second signal: stop now, without saving
            self.interrupted_twice = True
            raise KeyboardInterrupt
        self.signum = signum
        then = "after the current step and saving the adapter" if self.training else "before training begins"
        # Said by the main flow (the next stage check or step end), never here: a signal that lands while the main
        # thread writes to the same stream (a progress bar) makes a print in the handler a reentrant write.
        self.unsaid = f"received {signal.Signals(signum).name}: stopping {then}"

    def say_unsaid(self) -> None:
        """Print the stop notice the handler recorded, once."""
        if self.unsaid:
            print(self.unsaid, flush=True)
            self.unsaid = None

    def check(self) -> None:
        """Raise RunStopped if a stop signal has come (called between the stages before training)."""
        if self.signum is not None:
            self.say_unsaid()
            raise RunStopped

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def error(self) -> str | None:
        """What status.json says about a stopped run."""
        if self.interrupted_twice:
            return "interrupted twice: the adapter was not saved"
        return None if self.training else BEFORE_TRAINING

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {sig: signal.signal(sig, self.on_signal) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
