"""Run by torch.distributed.run from test_training: train with rank 1's noise forced to mask nothing.

Every micro-batch of rank 1 then has no masked token. Training must still finish on both ranks: a rank that skipped
its forward/backward would leave the other waiting in an FSDP collective (a hang, caught by the test's timeout).
"""

import os
import sys

import torch

from dreamlm.training import trainer
from dreamlm.training.config import TrainConfig

real_draw = trainer.draw_noise


def clean_on_rank_one(*args, **kwargs):
    noise = real_draw(*args, **kwargs)
    if os.environ.get("RANK") == "1":
        noise.masked = torch.zeros_like(noise.masked)
    return noise


trainer.draw_noise = clean_on_rank_one
trainer.train(TrainConfig.load(sys.argv[1]))
