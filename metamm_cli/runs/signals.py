"""Stop signals. During start-up SIGTERM (what Slurm and `kill` send) behaves like Ctrl-C: it
interrupts, the half-made run folder is removed and nothing is saved. While training,
:class:`StopSignals` takes both between steps, so a checkpoint never holds a half-done step.
An interruption says what it left behind (:func:`interrupted_line`): nothing, or, for a sweep
waiting on Slurm (:class:`metamm_cli.hydra_plugin.slurm.SlurmInterrupted`), the jobs that go on."""
from __future__ import annotations

import os
import signal
from typing import Optional, Sequence


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM before training started; ``signum`` gives the exit code (128 + it)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def describe(self, argv: Sequence[str]) -> str:
        """What the interruption left, in one line; ``argv``: the command's arguments."""
        return STARTUP


STARTUP = "interrupted during start-up; nothing was saved"


def interrupted_line(exc: KeyboardInterrupt, argv: Sequence[str] = ()) -> str:
    """The one line for an interruption (Ctrl-C's plain KeyboardInterrupt included)."""
    if isinstance(exc, Interrupted) and type(exc).describe is not Interrupted.describe:
        return exc.describe(argv)
    if any(a in ("-m", "--multirun") for a in argv):  # a local sweep: each started job saved last.pt
        return SWEEP
    return STARTUP


SWEEP = ("interrupted; every job that had started saved its checkpoints/last.pt; continue the sweep "
         "with the same command and trainer.resume=true (or trainer.resume=SWEEP_FOLDER)")


def _interrupt(signum, frame):
    raise Interrupted(signum)


def startup_signals() -> None:
    """SIGTERM and SIGINT raise :class:`Interrupted` (main thread only). SIGINT too, because a
    command started in the background of a script (``metamm train &``) inherits SIGINT ignored,
    and training (:class:`StopSignals`) takes it all the same: ``kill -INT`` then stops start-up
    as it stops training, instead of being lost until the first step."""
    try:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _interrupt)
    except ValueError:  # not the main thread
        pass


def exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + getattr(exc, "signum", signal.SIGINT)


class StopSignals:
    """SIGINT/SIGTERM set ``signum``; the loop checks it between steps. A second Ctrl-C exits at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def _handle(self, signum, frame):
        # os.write, not logging or print: the signal may arrive while the main thread is inside
        # a logging call or a buffered write, which are not reentrant (a "Logging error" traceback)
        if self.signum is not None and signum == signal.SIGINT:
            os.write(2, b"\nsecond Ctrl-C: exiting now, without a checkpoint\n")
            os._exit(130)
        self.signum = signum
        os.write(2, f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                    f"(Ctrl-C again to exit at once)\n".encode())

    def __enter__(self) -> "StopSignals":
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            pass
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
