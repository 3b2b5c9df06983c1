"""lib/rng.py: every draw is a function of (seed, stream, indices), and no two draws of a run share a seed."""
import itertools

import pytest
import torch

import train_toy
from lib.rng import HELD_OUT_SEED, Stream, derived_seed, forked_rng, generator, held_out_generator
from lib.swiss_roll import sample_swiss_roll
from lib.toy_task import ToyTask


def test_stream_tags_are_distinct():
    assert len({s.value for s in Stream}) == len(Stream)


def test_seeds_of_distinct_draws_differ_across_streams_seeds_and_indices():
    """Every (seed, stream, i, j) on a grid gets its own seed, including the pairs sums would confuse
    (seed + iteration: (0, 5) and (1, 4))."""
    keys = list(itertools.product(range(3), list(Stream), range(6), range(3)))
    seeds = {derived_seed(*key) for key in keys}
    assert len(seeds) == len(keys)
    assert all(0 <= s < 2**63 for s in seeds)


def test_a_generator_replays_its_draw_and_only_its_draw():
    a = torch.rand(4, generator=generator(3, Stream.TOY_BATCH, 7))
    assert torch.equal(a, torch.rand(4, generator=generator(3, Stream.TOY_BATCH, 7)))
    assert not torch.equal(a, torch.rand(4, generator=generator(3, Stream.TOY_BATCH, 8)))
    assert not torch.equal(a, torch.rand(4, generator=generator(3, Stream.EPOCH, 7)))


def test_a_forked_rng_leaves_the_callers_stream_as_it_was():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with forked_rng(1, Stream.EVALUATION, 5):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with forked_rng(1, Stream.EVALUATION, 5):
        assert torch.equal(torch.rand(3), inside)


def toy_task(seed):
    return ToyTask(train_toy.parse_args([f"--seed={seed}", "--device=cpu"]))


def test_no_toy_training_batch_replays_the_held_out_roll():
    """The held-out set is drawn from seed 20211. Toy batches used to be seeded seed * 1_000_003 + iteration, so at
    --seed=0 iteration 20211 drew the held-out set's roll positions again: batch point i sat on the held-out point
    i's position along the roll, a noise width (0.05) away. With named streams the two are unrelated: index-aligned
    points lie about a roll's width (~1) apart."""
    task = toy_task(seed=0)
    batch = next(task.batches(HELD_OUT_SEED - 1, torch.device("cpu")))  # iteration 20211
    held_out, _ = task.held_out(task.args.num_eval)
    aligned = (batch - held_out[:batch.shape[0]]).norm(dim=1)  # (512,)
    assert aligned.median().item() > 0.3
    # What the old seeding would have drawn, for contrast: the same positions along the roll.
    old = sample_swiss_roll(batch.shape[0], 0.5, torch.Generator().manual_seed(0 * 1_000_003 + HELD_OUT_SEED))
    assert (old - held_out[:batch.shape[0]]).norm(dim=1).median().item() < 0.15


@pytest.mark.parametrize("seed", [0, 1])
def test_toy_batches_depend_on_seed_and_iteration_only(seed):
    task = toy_task(seed)
    first = list(itertools.islice(task.batches(0, torch.device("cpu")), 3))
    resumed = next(task.batches(2, torch.device("cpu")))
    assert torch.equal(first[2], resumed)
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], next(toy_task(seed + 1).batches(0, torch.device("cpu"))))


def test_the_held_out_set_is_the_same_for_every_seed():
    a, _ = toy_task(0).held_out(100)
    b, _ = toy_task(5).held_out(100)
    assert torch.equal(a, b) and torch.equal(a, sample_swiss_roll(100, 0.5, held_out_generator()))
