"""train.py whose gradients overflow from the Nth training forward on (the first argument), while the loss stays
finite: each loss passes backward an infinite gradient. The NaN tests run it to show that such a step stops the run
before the update, which would destroy the weights."""
import runpy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import model  # noqa: E402

first, forward, calls = int(sys.argv.pop(1)), model.ModernBERT.forward, [0]


class Overflow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def overflowing(self, *args, **kwargs):
    logits, loss = forward(self, *args, **kwargs)
    if self.training and loss is not None:
        calls[0] += 1
        if calls[0] >= first:
            loss = Overflow.apply(loss)
    return logits, loss


model.ModernBERT.forward = overflowing  # what train.py's model (sharded, a subclass) calls
sys.argv[0] = str(REPO / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
