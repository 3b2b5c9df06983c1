"""Reliability of the training scripts (issues 7 and 16): a run killed with SIGKILL at any moment, or stopped
by SIGTERM / SIGUSR1 (pre-emption), and restarted with the same command ends with the weights of an
uninterrupted run; a diverging run stops with one line and keeps its last finite checkpoint; a full or
failing disk stops the run with one line naming the file, keeps the last checkpoint and lets the rerun
resume; bad arguments and corrupt, foreign or mismatched checkpoints are refused with one line naming
what is wrong.

The kill tests run the real train_toy.main in child processes (tests/child_processes.py) on a tiny
MLP; the comparisons are exact (bit for bit), since CPU arithmetic with one thread is deterministic.
"""
import glob
import json
import os
import random
import time

import pytest
import torch

import train_img
import train_toy
from child_processes import start
from fake_datasets import write_fake_image_dataset
from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.training import PREEMPTED

TOY = ["--num_iterations=24", "--print_every=5", "--checkpoint_every=4", "--sample_every=1000", "--num_steps=5",
       "--num_eval=40", "--elbo_repeats=2", "--num_samples=20", "--width=16", "--depth=1", "--lmbd=0.5",
       "--batch_size=32", "--ema_decay=0.9", "--lr_schedule=constant", "--warmup=0", "--device=cpu"]


def toy_argv(root, *extra):
    return [f"--saveroot={root}", "--expname=run", *TOY, *extra]


def run_child(root, *extra, faults=None, stderr_path=None):
    """Run train_toy in a child process to its end (or to the fault); returns its exit status."""
    process = start("train_toy", toy_argv(root, *extra), faults, stderr_path=stderr_path)
    process.join(timeout=120)
    assert process.exitcode is not None, "the child did not finish"
    return process.exitcode


def run_child_with_stderr(root, *extra, faults=None):
    """run_child, also returning the child's stderr."""
    path = os.path.join(root, "stderr.txt")
    status = run_child(root, *extra, faults=faults, stderr_path=path)
    with open(path) as fh:
        return status, fh.read()


def checkpoint_of(root):
    return load_checkpoint(os.path.join(root, "run", "checkpoint.pt"))


def partial_writes(root):
    run_dir = os.path.join(root, "run")
    return glob.glob(os.path.join(run_dir, ".checkpoint-*.tmp")) + glob.glob(os.path.join(run_dir, ".partial-*"))


def log_lines(root):
    with open(os.path.join(root, "run", "log.txt")) as fh:
        return fh.read().splitlines()


def metrics(root):
    """The run's metrics.jsonl without wall times (which differ between runs)."""
    with open(os.path.join(root, "run", "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in fh]


def assert_same_training_state(state, reference):
    assert state["iteration"] == reference["iteration"]
    for part in ("model_state", "ema_state"):
        for name, value in reference[part].items():
            assert torch.equal(state[part][name], value), (part, name, (state[part][name] - value).abs().max())
    for index, moments in reference["optimizer_state"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(state["optimizer_state"]["state"][index][name], value), (index, name)
    assert state["running_loss"] == reference["running_loss"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    assert run_child(root) == 0
    return checkpoint_of(root), metrics(root)


def test_kills_between_and_during_checkpoint_writes_resume_to_the_uninterrupted_weights(tmp_path, uninterrupted):
    reference, reference_metrics = uninterrupted
    # Checkpoints every 4 iterations: killed after iteration 10's update, iterations 9-10 are lost and replayed.
    assert run_child(tmp_path, faults={"kill_after_update": 10}) == -9
    assert checkpoint_of(tmp_path)["iteration"] == 8
    # Killed half-way through writing iteration 16's checkpoint: the file still holds iteration 12.
    assert run_child(tmp_path, faults={"kill_mid_write": 16}) == -9
    assert checkpoint_of(tmp_path)["iteration"] == 12 and len(partial_writes(tmp_path)) == 1
    # Killed right after iteration 20's checkpoint replaced the previous one.
    assert run_child(tmp_path, faults={"kill_after_rename": 20}) == -9
    assert checkpoint_of(tmp_path)["iteration"] == 20

    assert run_child(tmp_path) == 0
    assert_same_training_state(checkpoint_of(tmp_path), reference)
    assert metrics(tmp_path) == reference_metrics  # losses averaged across a kill, evaluations: all identical
    assert partial_writes(tmp_path) == []  # the torn write was cleaned up
    with open(os.path.join(tmp_path, "run", "log.txt")) as fh:
        assert [line.split()[-1] for line in fh if line.startswith("Resuming")] == ["8", "12", "20"]


def test_kills_at_random_moments_resume_to_the_uninterrupted_weights(tmp_path, uninterrupted):
    """SIGKILL after seeded random delays, with a checkpoint every iteration so that kills hit writes too.
    Where they land depends on the machine's speed; on a 2-core CPU these six fell in start-up, in
    training steps and in checkpoint writes (leaving a torn temporary file). Every checkpoint left
    behind must load."""
    reference, reference_metrics = uninterrupted
    rng = random.Random(7)
    for _ in range(6):
        process = start("train_toy", toy_argv(tmp_path, "--checkpoint_every=1"))
        time.sleep(rng.uniform(0.02, 0.5))
        process.kill()
        process.join(timeout=60)
        if os.path.exists(os.path.join(tmp_path, "run", "checkpoint.pt")):
            checkpoint_of(tmp_path)  # raises if the kill left a torn file
    assert run_child(tmp_path, "--checkpoint_every=1") == 0
    assert_same_training_state(checkpoint_of(tmp_path), reference)
    assert metrics(tmp_path) == reference_metrics
    assert partial_writes(tmp_path) == []


# --- pre-emption: SIGTERM / SIGUSR1 -------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_and_sigusr1_checkpoint_the_iteration_in_progress_and_the_rerun_ends_like_an_uninterrupted_run(
        tmp_path, uninterrupted):
    """The signals arrive during iterations 6 and 10 (checkpoints every 4): each stop writes a checkpoint of its
    own iteration. A second signal half-way through that write neither tears it nor ends the process early."""
    reference, reference_metrics = uninterrupted
    assert run_child(tmp_path, faults={"signal_after_update": ["SIGTERM", 6]}) == PREEMPTED
    assert checkpoint_of(tmp_path)["iteration"] == 6
    assert run_child(tmp_path, faults={"signal_after_update": ["SIGUSR1", 10],
                                       "signal_mid_write": ["SIGTERM", 10]}) == PREEMPTED
    assert checkpoint_of(tmp_path)["iteration"] == 10 and partial_writes(tmp_path) == []

    assert run_child(tmp_path) == 0
    assert_same_training_state(checkpoint_of(tmp_path), reference)
    assert metrics(tmp_path) == reference_metrics  # iteration 10's evaluation was done once, before the stop
    path = os.path.join(tmp_path, "run", "checkpoint.pt")
    assert [line for line in log_lines(tmp_path) if line.startswith(("Stopped", "Resuming"))] == [
        f"Stopped by SIGTERM after iteration 6: checkpoint written to {path}; rerun the same command to resume "
        "(exit status 75)",
        f"Resuming from {path} at iteration 6",
        f"Stopped by SIGUSR1 after iteration 10: checkpoint written to {path}; rerun the same command to resume "
        "(exit status 75)",
        f"Resuming from {path} at iteration 10",
    ]


@pytest.mark.slow
def test_a_signal_to_train_img_and_its_loader_workers_during_an_evaluation_stops_it_with_a_checkpoint(
        tmp_path, mnist_root):
    """A scheduler signals every process of the job. The data-loader workers must outlive the signal, or the
    evaluation in progress fails at its next test batch (torch reports the lost worker) and nothing is saved."""
    argv = ["--dataset=mnist", f"--dataroot={mnist_root}", f"--saveroot={tmp_path}", "--expname=run",
            "--num_iterations=3", "--print_every=2", "--sample_every=100", "--checkpoint_every=100",
            "--batch_size=8", "--test_batch_size=2", "--num_eval=16", "--ch=32", "--num_steps=2", "--num_samples=4",
            "--num_workers=1", "--device=cpu"]
    stderr = tmp_path / "stderr.txt"
    # The second evaluation is iteration 2's (the first is iteration 1's).
    process = start("train_img", argv, {"signal_family_during_evaluation": ["SIGTERM", 2]}, stderr_path=str(stderr))
    process.join(timeout=300)
    assert process.exitcode == PREEMPTED, stderr.read_text()[-3000:]
    assert stderr.read_text() == "" and checkpoint_of(tmp_path)["iteration"] == 2
    process = start("train_img", argv)
    process.join(timeout=300)
    assert process.exitcode == 0 and checkpoint_of(tmp_path)["iteration"] == 3
    assert f"Resuming from {tmp_path / 'run' / 'checkpoint.pt'} at iteration 2" in log_lines(tmp_path)


# --- a full or failing disk ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_or_failing_disk_stops_the_run_in_one_line_keeps_the_checkpoint_and_the_rerun_resumes(
        tmp_path, uninterrupted):
    """Writes fail as a full disk (ENOSPC), an I/O error (EIO) or a lost permission (EACCES) makes them fail,
    injected at the file-opening calls (tests/child_processes.py: failing_writes)."""
    reference, reference_metrics = uninterrupted
    run_dir = tmp_path / "run"
    hint = "free space or restore write access, then rerun the same command to resume"

    # The disk fills during iteration 10: the metrics line of its evaluation is the first write refused.
    status, err = run_child_with_stderr(tmp_path, faults={"failing_writes": {"from": 10, "files": ["*"]}})
    assert status == 1 and err == (f"train_toy.py: error: cannot write {run_dir / 'metrics.jsonl'} (No space left on "
                                   f"device); {hint} from the last checkpoint\n")
    assert checkpoint_of(tmp_path)["iteration"] == 8

    # Rerun before space is freed: refused up front. Almost full: resuming rewrites metrics.jsonl (dropping what
    # came after the checkpoint), which is refused and leaves the file as it was.
    status, err = run_child_with_stderr(tmp_path, faults={"failing_writes": {"from": 0, "files": ["*"]}})
    assert status == 1 and err == (f"train_toy.py: error: --saveroot={tmp_path} cannot be written (No space left on "
                                   "device); pick a folder you can write to\n")
    before = (run_dir / "metrics.jsonl").read_bytes()
    status, err = run_child_with_stderr(tmp_path, faults={"failing_writes": {"from": 0, "files": ["*metrics*"]}})
    assert status == 1 and len(err.splitlines()) == 1 and "metrics.jsonl (No space left on device)" in err, err
    assert (run_dir / "metrics.jsonl").read_bytes() == before

    # Space freed; checkpoint writes fail with an I/O error from iteration 11 on: iteration 12's is refused.
    status, err = run_child_with_stderr(tmp_path, faults={"failing_writes": {"from": 11, "files": [".checkpoint-*"],
                                                                             "errno": "EIO"}})
    ckpt = run_dir / "checkpoint.pt"
    assert status == 1 and err == (f"train_toy.py: error: cannot write {ckpt} (Input/output error); the last "
                                   f"checkpoint {ckpt} (iteration 8) is kept; {hint}\n")
    assert checkpoint_of(tmp_path)["iteration"] == 8 and partial_writes(tmp_path) == []

    # Write permission on TensorBoard's events files lost from iteration 9 on: TensorBoard writes from a thread
    # of its own, whose failure must still come out as one line naming the file.
    status, err = run_child_with_stderr(tmp_path, faults={"failing_writes": {"from": 9, "files": ["events.*"],
                                                                             "errno": "EACCES"}})
    assert status == 1 and len(err.splitlines()) == 1, err
    assert f"cannot write {run_dir}{os.sep}events.out.tfevents." in err and "(Permission denied)" in err

    assert run_child(tmp_path) == 0
    assert_same_training_state(checkpoint_of(tmp_path), reference)
    assert metrics(tmp_path) == reference_metrics
    assert partial_writes(tmp_path) == []


@pytest.mark.slow
def test_figures_that_cannot_be_written_warn_once_and_training_goes_on(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    status, err = run_child_with_stderr(tmp_path, "--sample_every=6",
                                        faults={"failing_writes": {"from": 0, "files": ["*.png"]}})
    path = tmp_path / "run" / "samples.png"
    assert status == 0 and err == (f"warning: cannot write {path} (No space left on device); training goes on without "
                                   "it (figures that fail later are skipped without a warning)\n")
    assert not glob.glob(str(tmp_path / "run" / "*.png")) and partial_writes(tmp_path) == []
    assert_same_training_state(checkpoint_of(tmp_path), reference)  # figures never change training


# --- divergence guard --------------------------------------------------------------------------


def test_a_huge_learning_rate_stops_with_one_line_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    # Adam's first step moves every weight by about lr = 1e30; the second forward overflows.
    with pytest.raises(SystemExit) as exit_info:
        train_toy.main(toy_argv(tmp_path, "--lr=1e30", "--checkpoint_every=1"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "diverged at iteration 2" in err and "loss is" in err and "--lr" in err
    path = os.path.join(tmp_path, "run", "checkpoint.pt")
    assert f"{path} (iteration 1) is kept" in err
    state = load_checkpoint(path)
    assert state["iteration"] == 1
    for part in ("model_state", "ema_state"):
        assert all(torch.isfinite(w).all() for w in state[part].values()), part


def test_weights_made_non_finite_by_an_update_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    """An update can overflow although its loss and gradient were finite (Adam at a float32-sized lr cannot
    on its first step, but other optimisers, or reduced precision, can): simulated by an inf written into
    one weight by the third step."""
    original_step, steps = torch.optim.Adam.step, []

    def step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(SystemExit) as exit_info:
        train_toy.main(toy_argv(tmp_path, "--checkpoint_every=1"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "diverged at iteration 3" in err and "weights non-finite" in err and "(iteration 2) is kept" in err
    state = load_checkpoint(os.path.join(tmp_path, "run", "checkpoint.pt"))
    assert state["iteration"] == 2 and all(torch.isfinite(w).all() for w in state["model_state"].values())


# --- bad input ---------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("--lr=0", "--lr"), ("--lr=-0.001", "--lr"), ("--lr=nan", "--lr"), ("--lr=inf", "--lr"), ("--lr=1e39", "--lr"),
    ("--lr=fast", "--lr"),
    ("--batch_size=0", "--batch_size"), ("--batch_size=-8", "--batch_size"), ("--batch_size=2.5", "--batch_size"),
    ("--num_iterations=0", "--num_iterations"), ("--num_iterations=-3", "--num_iterations"),
    ("--print_every=0", "--print_every"), ("--sample_every=-1", "--sample_every"),
    ("--checkpoint_every=0", "--checkpoint_every"), ("--num_steps=0", "--num_steps"), ("--seed=-1", "--seed"),
    ("--T0=0", "--T0"), ("--T0=0.001", "--T0"), ("--T0=0.0005", "--T0"), ("--vtype=normal", "--vtype"),
    ("--device=tpu", "--device"),
    ("--debias=true", "--debias"), ("--debias=1", "--debias"), ("--debias=", "--debias"), ("--amp=yes", "--amp"),
    ("--compile=on", "--compile"), ("--ema_decay=1.5", "--ema_decay"), ("--ema_decay=-0.1", "--ema_decay"),
    ("--no_such_flag=1", "--no_such_flag"),
]
TOY_ONLY = [("--lmbd=0,1.5", "--lmbd"), ("--lmbd=-0.5", "--lmbd"), ("--lmbd=0,,1", "--lmbd"),
            ("--width=0", "--width"), ("--noise=0", "--noise"), ("--num_eval=0", "--num_eval")]
IMG_ONLY = [("--dataset=imagenet", "--dataset"), ("--real=yes", "--real"), ("--lmbd=1.01", "--lmbd"),
            ("--lmbd=-0.1", "--lmbd"), ("--test_batch_size=0", "--test_batch_size"), ("--num_eval=0", "--num_eval"),
            ("--ch=48", "--ch"), ("--num_workers=-1", "--num_workers"), ("--num_samples=0", "--num_samples"),
            ("--channels_last=yes", "--channels_last")]
CASES = ([("toy", a, f) for a, f in BAD_ARGUMENTS + TOY_ONLY] + [("img", a, f) for a, f in BAD_ARGUMENTS + IMG_ONLY])


def run_main(script, argv):
    """The script's main(argv); returns (exit status, stderr lines) via the SystemExit it must raise."""
    main = {"toy": train_toy.main, "img": train_img.main}[script]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


@pytest.mark.parametrize("script, argument, flag", CASES, ids=[f"{s}:{a}" for s, a, _ in CASES])
def test_bad_argument_is_refused_with_one_line_naming_the_flag(tmp_path, capsys, script, argument, flag):
    status = run_main(script, [f"--saveroot={tmp_path / 'runs'}", "--device=cpu", argument])
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert flag in err
    assert not os.path.exists(tmp_path / "runs")  # refused before any work


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    write_fake_image_dataset("mnist", root)  # 64 training and 32 test images
    return root


@pytest.mark.parametrize("script, argument, flag", [
    ("toy", "--saveroot={file}/runs", "--saveroot"),
    ("img", "--saveroot={file}/runs", "--saveroot"),
    ("img", "--batch_size=65", "--batch_size"),
    ("img", "--num_eval=33", "--num_eval"),
])
def test_impossible_setup_is_refused_with_one_line_naming_the_flag(tmp_path, capsys, mnist_root, script, argument,
                                                                     flag):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    argv = [f"--saveroot={tmp_path / 'runs'}", "--device=cpu", "--num_workers=0", f"--dataroot={mnist_root}"]
    argv = argv[:2] if script == "toy" else argv
    status = run_main(script, [*argv, argument.format(file=file)])
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert flag in err


def test_a_run_folder_name_taken_by_a_file_is_refused_with_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    status = run_main("toy", [f"--saveroot={tmp_path}", "--expname=run", "--device=cpu"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1 and "--expname=run" in err, err


def test_resuming_drops_a_metrics_line_torn_by_a_kill(tmp_path):
    from lib.run_logger import RunLogger

    (tmp_path / "metrics.jsonl").write_text('{"iteration": 5, "loss": 1.0}\n{"iteration": 10, "loss": 0.5}\n'
                                            '{"iteration": 15, "lo')
    RunLogger(str(tmp_path)).resume_at(10)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iteration": 5, "loss": 1.0}\n{"iteration": 10, "loss": 0.5}\n'


# --- unusable checkpoints ----------------------------------------------------------------------


def write_garbage(path):
    path.write_bytes(b"\x00not a checkpoint" * 64)


def write_foreign(path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)


def write_truncated(path):
    save_checkpoint(path, {"kind": "toy", "iteration": 3, "x": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:300])


def write_other_run(path):
    save_checkpoint(path, {"kind": "toy", "iteration": 3, "args": {**vars(train_toy.parse_args(TOY)), "width": 32}})


def write_image_run(path):
    save_checkpoint(path, {"kind": "img", "iteration": 3, "args": {}})


def write_missing_weights(path):
    save_checkpoint(path, {"kind": "toy", "iteration": 3, "args": vars(train_toy.parse_args(TOY))})


@pytest.mark.parametrize("write, expected", [
    (write_garbage, "not a readable checkpoint"),
    (write_truncated, "not a readable checkpoint"),
    (write_foreign, "not an sdeflow checkpoint"),
    (write_other_run, "--width=32, this command has --width=16"),
    (write_image_run, "img run, not toy"),
    (write_missing_weights, "does not fit this run"),
])
def test_unusable_checkpoint_in_the_run_folder_is_one_line_and_no_restart(tmp_path, capsys, write, expected):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "checkpoint.pt"
    write(path)
    before = path.read_bytes()
    status = run_main("toy", [f"--saveroot={tmp_path}", "--expname=run", *TOY])
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err and expected in err and ("delete it" in err or "pick another --expname" in err)
    assert path.read_bytes() == before  # left for the user to inspect, not overwritten
    assert not os.path.exists(run_dir / "metrics.jsonl")  # no silent restart from scratch
