"""``python tests/sigkill_after_checkpoint.py N icd-train-args...``: ``icd train`` that SIGKILLs itself
right after the first checkpoint written at iteration N or later (the resume test's hard kill).

The kill comes from this harness, not from icd: ``Trainer.save`` is wrapped in this process only.
"""

from __future__ import annotations

import os
import signal
import sys

from icd.cli import main
from icd.engine.trainer import Trainer


def kill_after(iteration: int) -> None:
    """Wrap Trainer.save: once a checkpoint of ``iteration`` or later is on disk, SIGKILL."""
    save = Trainer.save

    def save_then_kill(self: Trainer, *args, **kwargs):
        saved = save(self, *args, **kwargs)
        if self.iteration >= iteration:
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    Trainer.save = save_then_kill


if __name__ == "__main__":
    kill_after(int(sys.argv[1]))
    sys.exit(main(["train", *sys.argv[2:]]))
