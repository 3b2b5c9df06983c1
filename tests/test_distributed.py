"""Data-parallel training with torch.distributed (issues 8 and 16): two CPU processes with gloo, as torchrun
starts them.

Two tests launch the real torchrun (one of them has it restart the group after a worker is killed); the
others form the same process group from forked children with torchrun's environment variables
(tests/child_processes.py), which start in a fraction of a second.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_img
from child_processes import join_all, start_function, start_group, torchrun_env
from fake_datasets import write_fake_image_dataset
from lib.checkpoint import load_checkpoint
from lib.training import PREEMPTED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--expname=run", "--print_every=2", "--checkpoint_every=2", "--sample_every=100", "--num_steps=4",
       "--num_eval=40", "--elbo_repeats=2", "--num_samples=20", "--width=16", "--depth=1", "--lmbd=0.5",
       "--batch_size=32", "--lr_schedule=constant", "--warmup=0", "--device=cpu"]


def load_weights(path):
    return torch.load(path, weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), (name, (value - b[name]).abs().max())


def test_torchrun_two_ranks_write_one_run_folder_and_hold_identical_weights(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "child_processes", json.dumps({"record_weights": str(weights)}),
               "train_toy", f"--saveroot={tmp_path / 'runs'}", "--num_iterations=4", *TOY]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    assert os.listdir(tmp_path / "runs") == ["run"]
    run_dir = tmp_path / "runs" / "run"
    files = sorted(os.listdir(run_dir))
    assert [f for f in files if not f.startswith("events.")] == [
        "args.json", "checkpoint.pt", "log.txt", "metrics.jsonl", "samples.png"]
    assert len([f for f in files if f.startswith("events.")]) == 1  # one TensorBoard writer: rank 0's
    lines = (run_dir / "log.txt").read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "2", "4"]  # each evaluation logged once

    # DDP averages the gradients, so both ranks take the same step each iteration, from the same start.
    for it in range(1, 5):
        assert_same_weights(load_weights(weights / f"rank0_{it}.pt"), load_weights(weights / f"rank1_{it}.pt"))
    assert not torch.equal(load_weights(weights / "rank0_1.pt")["inp.weight"],
                           load_weights(weights / "rank0_4.pt")["inp.weight"])  # (training moved them)
    state = load_checkpoint(str(run_dir / "checkpoint.pt"))
    assert state["world_size"] == 2 and state["iteration"] == 4
    assert not any(name.startswith("module.") for name in state["model_state"])  # the unwrapped network
    assert_same_weights(state["model_state"], load_weights(weights / "rank0_4.pt"))


def test_two_ranks_killed_and_resumed_end_like_an_uninterrupted_two_rank_run(tmp_path):
    """Every rank resumes from rank 0's checkpoint; each rank's loss noise is a function of
    (seed, rank, iteration), so the replayed iterations draw what they drew before."""
    straight = start_group("train_toy", [f"--saveroot={tmp_path / 'straight'}", "--num_iterations=6", *TOY], 2)
    assert join_all(straight) == [0, 0]
    argv = [f"--saveroot={tmp_path / 'resumed'}", "--num_iterations=6", *TOY]
    # Both ranks die right after iteration 3's update: iteration 3 is lost, the checkpoint holds 2.
    assert join_all(start_group("train_toy", argv, 2, faults={"kill_after_update": 3})) == [-9, -9]
    assert load_checkpoint(str(tmp_path / "resumed" / "run" / "checkpoint.pt"))["iteration"] == 2
    assert join_all(start_group("train_toy", argv, 2)) == [0, 0]

    resumed, reference = (load_checkpoint(str(tmp_path / d / "run" / "checkpoint.pt")) for d in ("resumed", "straight"))
    assert resumed["iteration"] == reference["iteration"] == 6
    for part in ("model_state", "ema_state"):
        assert_same_weights(resumed[part], reference[part])
    for index, moments in reference["optimizer_state"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(resumed["optimizer_state"]["state"][index][name], value)


@pytest.fixture(scope="module")
def straight_two_ranks(tmp_path_factory):
    """The final checkpoint of an uninterrupted 8-iteration run on two ranks."""
    root = tmp_path_factory.mktemp("straight")
    assert join_all(start_group("train_toy", [f"--saveroot={root}", "--num_iterations=8", *TOY], 2)) == [0, 0]
    return load_checkpoint(str(root / "run" / "checkpoint.pt"))


def assert_same_training_state(state, reference):
    assert state["iteration"] == reference["iteration"]
    for part in ("model_state", "ema_state"):
        assert_same_weights(state[part], reference[part])
    for index, moments in reference["optimizer_state"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(state["optimizer_state"]["state"][index][name], value), (index, name)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_one_iteration_and_the_rerun_ends_like_an_uninterrupted_run(
        tmp_path, straight_two_ranks):
    """SIGUSR1 reaches rank 1 alone, after iteration 4's all-reduce: the flag rides in iteration 5's, so both
    ranks finish iteration 5 and rank 0 checkpoints it (the regular checkpoints fall on even iterations)."""
    argv = [f"--saveroot={tmp_path}", "--num_iterations=8", *TOY]
    processes = start_group("train_toy", argv, 2, faults={"signal_after_update": ["SIGUSR1", 4, 1]},
                            stderr_dir=str(tmp_path))
    assert join_all(processes) == [PREEMPTED, PREEMPTED]
    assert (tmp_path / "stderr_rank0.txt").read_text() == (tmp_path / "stderr_rank1.txt").read_text() == ""
    path = tmp_path / "run" / "checkpoint.pt"
    assert load_checkpoint(str(path))["iteration"] == 5
    assert (tmp_path / "run" / "log.txt").read_text().splitlines()[-1] == (
        f"Stopped by SIGUSR1 on rank 1 after iteration 5: checkpoint written to {path}; rerun the same command to "
        "resume (exit status 75)")
    assert join_all(start_group("train_toy", argv, 2)) == [0, 0]
    assert_same_training_state(load_checkpoint(str(path)), straight_two_ranks)


@pytest.mark.slow
def test_torchrun_restarts_the_group_after_a_worker_is_killed_and_it_ends_like_an_uninterrupted_run(
        tmp_path, straight_two_ranks):
    """Rank 0 is SIGKILLed after iteration 5's update (checkpoints every 2); torchrun --max-restarts=1 stops rank 1
    and starts both again, which resume from iteration 4's checkpoint. The restarted rank 0 comes up 5 s late, so
    rank 1 would take the address the killed rank 0 left in torchrun's store unless each attempt has keys of its
    own (lib/distributed.py); without them this run failed or hung in 3 tries out of 3."""
    faults = {"kill_rank_after_update": [0, 5], "slow_restart": [0, 5]}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
               "--monitor-interval=0.1", "-m", "child_processes", json.dumps(faults),
               "train_toy", f"--saveroot={tmp_path}", "--num_iterations=8", *TOY]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        launcher.terminate()  # torchrun passes it on to its workers, and kills them 30 s later
        _, stderr = launcher.communicate(timeout=60)
        pytest.fail(f"torchrun did not finish: {stderr[-3000:]}")
    assert launcher.returncode == 0, stderr[-3000:]
    path = tmp_path / "run" / "checkpoint.pt"
    assert f"Resuming from {path} at iteration 4" in (tmp_path / "run" / "log.txt").read_text()
    assert_same_training_state(load_checkpoint(str(path)), straight_two_ranks)


def test_a_nan_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """Rank 1 alone gets a NaN loss at iteration 3: both ranks must stop there (none left waiting in an
    all-reduce), rank 0 prints the one line, and the checkpoint of iteration 2 stays finite."""
    argv = [f"--saveroot={tmp_path}", "--num_iterations=6", *TOY]
    processes = start_group("train_toy", argv, 2, faults={"nan_loss": [1, 3]}, stderr_dir=str(tmp_path))
    assert join_all(processes, timeout=120) == [1, 1]
    err0 = (tmp_path / "stderr_rank0.txt").read_text().strip()
    assert len(err0.splitlines()) == 1, err0
    assert "diverged at iteration 3: the loss is nan on rank 1" in err0 and "(iteration 2) is kept" in err0
    assert (tmp_path / "stderr_rank1.txt").read_text().strip() == ""
    state = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert state["iteration"] == 2
    assert all(torch.isfinite(w).all() for w in state["model_state"].values())


# --- sharded evaluation ------------------------------------------------------------------------


def evaluate_fixed_model(dataroot, out, env):
    """In a child: join the group described by env (none if empty), evaluate bits/dim of a fixed random
    U-Net on 30 test images in batches of 4 (8 batches, the last short), rank 0 saves the metrics."""
    from lib.distributed import init_distributed, shutdown
    from lib.image_task import ImageTask
    from lib.models import build_drift
    from lib.sdes import PluginReverseSDE, build_sde

    os.environ.update(env)
    ctx = init_distributed("cpu")
    args = train_img.parse_args([f"--dataroot={dataroot}", "--num_eval=30", "--test_batch_size=4", "--ch=32",
                                 "--num_workers=0", "--device=cpu"])
    task = ImageTask(args, rank=ctx.rank, world_size=ctx.world_size)
    torch.manual_seed(0)
    drift = build_drift(task.model["name"], task.model["kwargs"])
    with torch.no_grad():
        for p in drift.parameters():  # away from the zero function DDPM's initialisation starts at
            p.add_(0.05 * torch.randn_like(p))
    gen_sde = PluginReverseSDE(build_sde(task.sde), drift, args.T0, vtype=args.vtype).eval()
    metrics = task.evaluate(gen_sde, 7)
    if ctx.is_main:
        torch.save(metrics, out)
    shutdown(ctx)


def test_sharded_evaluation_equals_the_single_process_evaluation(tmp_path):
    """Each test image counted once, with the same per-example value, so the bits/dim mean and standard
    error over two ranks equal those of one process exactly."""
    write_fake_image_dataset("mnist", tmp_path / "data")  # 32 test images
    single = start_function(evaluate_fixed_model, str(tmp_path / "data"), str(tmp_path / "single.pt"), {})
    group = [start_function(evaluate_fixed_model, str(tmp_path / "data"), str(tmp_path / "sharded.pt"), env)
             for env in torchrun_env(2)]
    assert join_all([single, *group]) == [0, 0, 0]
    single, sharded = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "sharded.pt")
    assert sharded == single, (sharded, single)
    assert 8 < single["bpd"] < 100 and single["bpd_std_err"] > 0
