"""train_toy.py end to end: a short run's outputs, their values against the true density, resuming, load_model."""
import json
import math
import os

import pytest
import torch

import train_toy
from lib.checkpoint import load_model
from lib.likelihood import ode_log_likelihood
from lib.models.mlp import MLPDrift
from lib.rng import held_out_generator
from lib.sdes import PluginReverseSDE, VariancePreservingSDE
from lib.swiss_roll import sample_swiss_roll

SMALL = ["--num_iterations=300", "--print_every=100", "--checkpoint_every=100", "--sample_every=300",
         "--num_steps=40", "--num_eval=400", "--elbo_repeats=16", "--num_samples=300", "--width=64",
         "--depth=2", "--lmbd=0,0.5,1", "--warmup=20", "--device=cpu"]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train_toy.main([f"--saveroot={root}", "--expname=toy", *SMALL])
    return os.path.join(root, "toy"), root


def test_run_folder_holds_every_output(toy_run):
    run_dir, _ = toy_run
    for name in ("args.json", "log.txt", "metrics.jsonl", "checkpoint.pt", "samples.png", "trajectories.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    for name in ("samples.png", "trajectories.png"):
        with open(os.path.join(run_dir, name), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(run_dir, "args.json")) as fh:
        assert json.load(fh)["num_iterations"] == 300
    lines = open(os.path.join(run_dir, "log.txt")).read().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "100", "200", "300"]
    assert "ELBO" in lines[-1] and "ODE" in lines[-1] and "true" in lines[-1] and "±" in lines[-1]


def test_tensorboard_has_the_scalars_and_figures(toy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(toy_run[0])
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss", "elbo", "elbo_gap", "ode", "ode_gap", "true_log_likelihood"} <= scalars
    assert [e.step for e in acc.Scalars("elbo")] == [1, 100, 200, 300]
    assert {"samples", "trajectories"} <= set(acc.Tags()["images"])


def test_estimates_respect_gibbs_inequality_and_training_helps(toy_run):
    """A normalised model cannot beat the true density on average: E[log q] <= E[log p] (up to noise),
    and the ELBO lower-bounds the model's own log-likelihood. Training must improve the ELBO."""
    first, last = records(toy_run[0])[0], records(toy_run[0])[-1]
    assert last["ode_nfe"] > 0
    for name in ("elbo", "ode"):
        assert last[f"{name}_gap"] < 3 * last[f"{name}_gap_std_err"] + 1e-3, name
    assert last["elbo"] > first["elbo"] + 1.0
    assert last["elbo_gap"] > -3.0  # a few hundred steps already land within a few nats


def test_load_model_reproduces_the_reported_exact_likelihood(toy_run):
    run_dir, _ = toy_run
    gen_sde = load_model(os.path.join(run_dir, "checkpoint.pt"))
    x = sample_swiss_roll(400, 0.5, held_out_generator())
    logp, _ = ode_log_likelihood(gen_sde, x)
    assert logp.mean().item() == pytest.approx(records(run_dir)[-1]["ode"], abs=1e-6)


def test_rerunning_a_finished_run_changes_nothing_and_a_cosine_schedule_cannot_be_extended(toy_run, capsys):
    """The default schedule decays to 0 at --num_iterations, so more iterations would be another run.
    (Resuming an interrupted run is tested in test_reliability.py.)"""
    _, root = toy_run
    run_dir = os.path.join(root, "toy")
    before = open(os.path.join(run_dir, "checkpoint.pt"), "rb").read()
    train_toy.main([f"--saveroot={root}", "--expname=toy", *SMALL])
    assert "Run already complete at iteration 300" in open(os.path.join(run_dir, "log.txt")).read()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_toy.main([f"--saveroot={root}", "--expname=toy", *SMALL, "--num_iterations=350"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--num_iterations=300" in err and "--num_iterations=350" in err
    assert open(os.path.join(run_dir, "checkpoint.pt"), "rb").read() == before
    assert [r["iteration"] for r in records(run_dir)] == [1, 100, 200, 300]


def test_compile_trains_with_inductor_like_eager_and_saves_the_original_network(tmp_path):
    """--compile=True with torch.compile's default backend (inductor, which builds C++ kernels with gcc:
    about 10 s on a 2-core CPU for this MLP). Inductor fuses operations, so float32 results agree to
    rounding, not bit for bit. Adam divides each gradient by its own running scale, so a coordinate whose
    gradient is itself at rounding level (near zero) can move by up to lr per step in either run: such rare
    coordinates may differ by 2 steps x lr, every other one agrees to float32 rounding."""
    tiny = [f"--saveroot={tmp_path}", "--num_iterations=2", "--print_every=1", "--sample_every=100", "--num_steps=4",
            "--num_eval=40", "--elbo_repeats=2", "--num_samples=20", "--width=16", "--depth=1", "--lmbd=0.5",
            "--batch_size=32", "--lr_schedule=constant", "--warmup=0", "--device=cpu"]
    train_toy.main([*tiny, "--expname=eager"])
    train_toy.main([*tiny, "--expname=compiled", "--compile=True"])
    eager, compiled = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("eager", "compiled"))
    assert compiled["model_state"].keys() == eager["model_state"].keys()  # no '_orig_mod.' prefixes
    lr = 2e-3  # train_toy.py's default; 2 iterations
    for name, w in eager["model_state"].items():
        diff = (compiled["model_state"][name] - w).abs()
        assert diff.max().item() <= 2 * lr, name
        assert (diff <= 1e-6 + 1e-4 * w.abs()).float().mean().item() >= 0.99, name
    for c, e in zip(records(tmp_path / "compiled"), records(tmp_path / "eager")):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-5)


def test_the_controlled_elbo_has_the_plain_elbos_mean_and_far_less_noise():
    """lib/toy_task.py's control variate: log p(x) + ELBO_a(x) - ELBO_a*(x) on shared draws has the mean of the
    model's plain ELBO (up to delta(x) < 1e-4 nats, far below the errors here) and a smaller spread, the more so
    the closer a is to a*. A small drift trained 300 steps, 1000 held-out points: the means differ by less than
    4 standard errors, and one controlled draw varies less than half as much per point as one plain draw
    (measured 3.5x here; about 170x on the default 20k-step run, where a is close to a*)."""
    from lib.toy_task import ToyTask

    task = ToyTask(train_toy.parse_args(["--num_eval=1000", "--elbo_times=4", "--device=cpu"]))
    sde = VariancePreservingSDE()
    drift = MLPDrift(dim=2, width=32, depth=1, local_std=0.05)
    gen = PluginReverseSDE(sde, drift, 1.0, debias=True)
    opt = torch.optim.Adam(drift.parameters(), lr=2e-3)
    torch.manual_seed(0)
    for _ in range(300):
        loss = gen.dsm(sample_swiss_roll(256, 0.5)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen.eval()
    x, true_logp = task.held_out(1000)
    with torch.no_grad():
        controlled = torch.stack([task.controlled_elbo(gen, x, true_logp) for _ in range(2)])  # (2, N)
        plain = torch.stack([gen.elbo(x, num_times=4).double() for _ in range(8)])  # (8, N)
    diff = controlled.mean(0) - plain.mean(0)
    se = diff.std().item() / math.sqrt(1000)
    assert abs(diff.mean().item()) < 4 * se, (diff.mean().item(), se)
    assert controlled.var(0).mean() * 2 < plain.var(0).mean(), (controlled.var(0).mean(), plain.var(0).mean())


def test_a_run_killed_before_its_first_checkpoint_leaves_no_duplicate_metrics(tmp_path):
    """A kill after the first evaluation but before the first checkpoint leaves metrics.jsonl without a
    checkpoint; the rerun starts afresh and must not append its iteration 1 after the stale one."""
    tiny = [f"--saveroot={tmp_path}", "--expname=run", "--num_iterations=2", "--print_every=1", "--sample_every=100",
            "--checkpoint_every=2", "--num_steps=4", "--num_eval=40", "--elbo_times=4", "--num_samples=20",
            "--width=16", "--depth=1", "--lmbd=0.5", "--batch_size=32", "--lr_schedule=constant", "--warmup=0",
            "--device=cpu"]
    os.makedirs(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "w") as fh:
        fh.write(json.dumps({"iteration": 1, "loss": 9.0}) + "\n")
    train_toy.main(tiny)
    assert [r["iteration"] for r in records(tmp_path / "run")] == [1, 2]
