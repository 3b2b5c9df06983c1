"""Checkpoints written before the tasks / pixels / random-streams refactor still load, evaluate to the very same
figures, sample, and resume; and the tools load none of the training loop.

tests/data/v1/ holds an image and a toy checkpoint in the format train_img.py / train_toy.py wrote at commit
08558b1, and what that commit's evaluate.py and sample.py reported on them (expected.json, "_how" says how
they were made). Same code path, same seeds, same CPU arithmetic: the figures must agree to float64 rounding
(with the ELBO's one time per example of that commit: --num_times=1).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import evaluate
import sample
from fake_datasets import write_fake_image_dataset

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "v1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(V1, "expected.json")) as fh:
    EXPECTED = json.load(fh)


@pytest.fixture(scope="module")
def v1_runs(tmp_path_factory):
    """The two checkpoints in run folders of their own, and the fake MNIST data the image run was trained on."""
    root = tmp_path_factory.mktemp("v1")
    write_fake_image_dataset("mnist", root / "data")
    paths = {}
    for kind in ("img", "toy"):
        os.makedirs(root / kind)
        paths[kind] = str(root / kind / "checkpoint.pt")
        shutil.copy(os.path.join(V1, f"{kind}_checkpoint.pt"), paths[kind])
    return root, paths


def report(tmp_path, argv):
    out = tmp_path / "report.json"
    evaluate.main([*argv, "--device=cpu", f"--output={out}"])
    with open(out) as fh:
        data = json.load(fh)
    data.pop("checkpoint")
    return data


@pytest.mark.parametrize("name, argv", [
    ("img_elbo", ["elbo", "--num_eval=12", "--test_batch_size=5", "--num_times=1"]),
    ("img_slice", ["elbo", "--estimator=random_t_slice", "--elbo_repeats=3", "--num_eval=6"]),
    ("img_ode", ["ode", "--num_eval=3", "--rtol=1e-3", "--atol=1e-3"]),
    ("toy_elbo", ["elbo", "--num_eval=300", "--num_times=1"]),
    ("toy_ode", ["ode", "--num_eval=50"]),
])
def test_an_old_checkpoint_evaluates_to_the_figures_it_had(v1_runs, tmp_path, name, argv):
    root, paths = v1_runs
    kind = name.split("_")[0]
    data = [f"--dataroot={root / 'data'}"] if kind == "img" else []
    got = report(tmp_path, [*argv, f"--checkpoint={paths[kind]}", *data])
    expected = EXPECTED[name]
    assert got.keys() >= expected.keys()  # today's reports add keys (per-example values, the estimator's noise)
    if name == "img_slice":
        # Repeated draws are now made one batch at a time, so memory stays that of one batch: other draws from the
        # same seed, the same estimate. Within 3 standard errors of the mean over the 6 images.
        assert abs(got["bpd"] - expected["bpd"]) < 3 * expected["bpd_std_err"]
        expected = {k: v for k, v in expected.items() if k not in ("bpd", "bpd_std_err")}
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        else:
            assert got[key] == value, key


def test_an_old_toy_checkpoint_samples_with_its_network_evaluations(v1_runs, tmp_path):
    _, paths = v1_runs
    sample.main(["em", f"--checkpoint={paths['toy']}", "--lmbd=0,1", "--num_steps=20", "--num_samples=100",
                 f"--outdir={tmp_path}", "--device=cpu"])
    with open(tmp_path / "samples.csv") as fh:
        rows = [line.split(",") for line in fh.read().splitlines()[1:]]
    assert {row[0]: int(row[3]) for row in rows} == EXPECTED["toy_em_nfe"]


def test_an_old_toy_run_is_recognised_under_its_former_flag_names(v1_runs, tmp_path, capsys):
    """Its stored arguments say --lambdas (now --lmbd): today's command that wrote it is the same run (it ended at
    iteration 20 of a cosine schedule), not a conflicting one."""
    import train_toy

    _, paths = v1_runs
    shutil.copytree(os.path.dirname(paths["toy"]), tmp_path / "toy")
    train_toy.main([f"--saveroot={tmp_path}", "--expname=toy", "--num_iterations=20", "--print_every=20",
                    "--sample_every=100", "--checkpoint_every=20", "--num_eval=200", "--elbo_repeats=4",
                    "--width=32", "--depth=2", "--num_steps=5", "--num_samples=50", "--lmbd=0,1", "--device=cpu"])
    out = capsys.readouterr().out
    assert "Resuming from" in out and "Run already complete at iteration 20" in out


def test_an_old_image_run_resumed_with_todays_defaults_names_every_changed_default_at_once(v1_runs, tmp_path,
                                                                                          capsys):
    """The run was written before --precond existed (read as False) and with the learning rate then the default
    (1e-4): rerunning its command line is refused in one line that lists both, so one more try resumes it."""
    import train_img

    root, paths = v1_runs
    shutil.copytree(os.path.dirname(paths["img"]), tmp_path / "img")
    with pytest.raises(SystemExit) as exit_info:
        train_img.main([f"--dataroot={root / 'data'}", f"--saveroot={tmp_path}", "--expname=img", "--num_iterations=3",
                        "--batch_size=8", "--print_every=3", "--sample_every=100", "--checkpoint_every=3",
                        "--num_steps=3", "--test_batch_size=16", "--num_eval=10", "--num_samples=4",
                        "--num_workers=0", "--ch=32", "--device=cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert ("was written with --lr=0.0001 --precond=False, this command has --lr=0.0005 --precond=True; "
            "pass --lr=0.0001 --precond=False to resume") in err, err


def test_the_tools_load_none_of_the_training_loop(v1_runs):
    """sample.py and evaluate.py, imported and run, never import the loop, its EMA, logger or DDP wrapper code."""
    root, paths = v1_runs
    code = (
        "import sys, evaluate, sample\n"
        f"evaluate.main(['elbo', '--checkpoint={paths['img']}', '--dataroot={root / 'data'}', '--num_eval=2',"
        " '--device=cpu'])\n"
        "loaded = {m for m in ('lib.training', 'lib.ema', 'lib.run_logger', 'train_img', 'train_toy')\n"
        "          if m in sys.modules}\n"
        "print('LOADED', sorted(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out, out
