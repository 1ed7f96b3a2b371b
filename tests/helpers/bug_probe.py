"""train_single.py with a bug planted in the training step (an error no code expects), to show what the
error boundary makes of a real bug. The probe replaces Trainer.advance from outside."""

import sys

import train_single
from utils.train.trainer import Trainer


def planted_bug(self: Trainer):
    return 1 / 0


if __name__ == "__main__":
    Trainer.advance = planted_bug
    sys.exit(train_single.main())
