"""Run by the DDP tests under torchrun: ``icd train`` with the given flags, then every rank writes
its own student and distiller state to OUTPUT_DIR/rank{RANK}.pth (the trainer writes rank 0's only)."""

from __future__ import annotations

import os
import sys

import torch

from icd.cli import build_parser
from icd.engine.trainer import Trainer, _unwrap

if __name__ == "__main__":
    args = build_parser().parse_args(["train", *sys.argv[1:]])
    trainer = Trainer(args)
    try:
        trainer.run()
        state = {"iteration": trainer.iteration, "model": _unwrap(trainer.model).state_dict()}
        if trainer.distiller is not None:
            state["distiller"] = trainer.distiller.state_dict()
        torch.save(state, os.path.join(args.output_dir, f"rank{trainer.info.rank}.pth"))
    finally:
        trainer.close()
