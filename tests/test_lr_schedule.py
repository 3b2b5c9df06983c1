"""The learning-rate schedule of the shared training loop, and its consequence for resuming."""
from types import SimpleNamespace

import pytest

from lib.checkpoint import CheckpointError, check_same_run
from lib.toy_task import ToyTask
from lib.training import learning_rate


def schedule(kind, lr=2e-3, warmup=100, num_iterations=1100):
    return SimpleNamespace(lr=lr, lr_schedule=kind, warmup=warmup, num_iterations=num_iterations)


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_warmup_rises_linearly_from_zero_to_lr(kind):
    args = schedule(kind)
    assert [learning_rate(it, args) for it in (1, 50, 100)] == pytest.approx([2e-5, 1e-3, 2e-3])


def test_constant_schedule_holds_lr_after_the_warmup():
    args = schedule("constant")
    assert all(learning_rate(it, args) == 2e-3 for it in (101, 600, 1100))


def test_cosine_schedule_halves_midway_and_ends_at_zero():
    """lr (1 + cos(pi p)) / 2 with p the fraction of the post-warm-up iterations done."""
    args = schedule("cosine")
    assert learning_rate(600, args) == pytest.approx(1e-3)
    assert learning_rate(350, args) == pytest.approx(2e-3 * (1 + 2 ** -0.5) / 2)
    assert learning_rate(1100, args) == pytest.approx(0.0, abs=1e-18)
    rates = [learning_rate(it, args) for it in range(100, 1101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_no_warmup_starts_at_lr():
    assert learning_rate(1, schedule("cosine", warmup=0)) == pytest.approx(2e-3, rel=1e-5)


def saved_state(**args):
    return {"kind": "toy", "args": args}


def test_resuming_may_extend_a_constant_schedule_but_not_a_cosine_one():
    constant = dict(lr_schedule="constant", num_iterations=300)
    check_same_run(saved_state(**constant), SimpleNamespace(**{**constant, "num_iterations": 500}), ToyTask, "ckpt")
    cosine = dict(lr_schedule="cosine", num_iterations=300)
    with pytest.raises(CheckpointError, match="--num_iterations=300"):
        check_same_run(saved_state(**cosine), SimpleNamespace(**{**cosine, "num_iterations": 500}), ToyTask, "ckpt")
