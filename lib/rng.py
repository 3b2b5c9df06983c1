"""Named random streams: every random draw of a run is a function of (seed, stream, indices).

The indices are whatever locates the draw: the rank and the iteration for training noise, the
epoch for a permutation, the test batch for evaluation. `derived_seed` hashes the whole tuple with
numpy's SeedSequence, so distinct tuples give unrelated seeds. Sums such as seed * 1_000_003 +
iteration do not: they make (seed=0, iteration=20211) replay the toy's held-out set (seed 20211), and
(seed=1, iteration=4) replay (seed=0, iteration=1_000_007). A resumed run redraws exactly what the
uninterrupted one drew, since nothing depends on how many draws came before (docs/math.md section 6).
"""
import contextlib
import random
from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """What a draw is for; the second entry of every seed tuple. Values are part of the results: never reuse one."""

    LOSS_NOISE = 1      # (rank, iteration): times, Y_s, probes and dropout of one training step
    EVALUATION = 2      # (iteration, test batch, part): dequantisation and ELBO noise of an in-run evaluation
    SAMPLES = 3         # (iteration,): the in-run sample figures
    FINISH = 4          # (): the end-of-run figures
    TRAINING_DATA = 5   # (rank, iteration): dequantisation noise and flips of a training batch
    TOY_BATCH = 6       # (iteration,): the swiss-roll training batch
    EPOCH = 7           # (epoch,): the permutation of the training set
    SAMPLE_PRIOR = 8    # (): sample.py's prior draw
    SAMPLE_NOISE = 9    # (lambda in millionths,): sample.py's sampler noise for one lambda
    FRESH_DATA = 10     # (): sample.py's fresh swiss-roll data to compare samples with


# The toy's held-out points: one fixed set for every --seed, so runs with different seeds are compared on
# the same points. A constant, not a stream: no training draw is seeded by a bare number any more.
HELD_OUT_SEED = 20211


def derived_seed(seed, stream, *indices):
    """A seed in [0, 2^63) for the draw (seed, stream, *indices), all non-negative integers."""
    parts = [int(seed), int(stream), *(int(i) for i in indices)]
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0] >> 1)


def generator(seed, stream, *indices, device="cpu"):
    """A torch.Generator on `device` seeded for the draw (seed, stream, *indices)."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, stream, *indices))


def held_out_generator(offset=0):
    """The generator of the toy's fixed held-out set (offset 1: the reference data of its figures)."""
    return torch.Generator().manual_seed(HELD_OUT_SEED + offset)


def seed_everything(seed):
    """Seed torch (CPU and every CUDA device), numpy's and python's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_global(seed, stream, *indices):
    """Make the global RNGs a pure function of (seed, stream, *indices): for draws made inside library code
    that takes no generator (the loss's times and noise, dropout)."""
    seed_everything(derived_seed(seed, stream, *indices))


@contextlib.contextmanager
def forked_rng(seed, stream, *indices, device=torch.device("cpu")):
    """Run a block on torch's global RNG seeded for (seed, stream, *indices), leaving the caller's stream as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derived_seed(seed, stream, *indices))
        yield
