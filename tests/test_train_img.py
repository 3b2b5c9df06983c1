"""train_img.py end to end on tiny MNIST / CIFAR-10 files in torchvision's own formats, read by its own classes."""
import json
import os

import pytest
import torch

import train_img
from fake_datasets import fake_cifar10_checksums, write_fake_image_dataset
from lib.checkpoint import load_model

SMALL = ["--num_iterations=3", "--print_every=2", "--sample_every=3", "--checkpoint_every=2", "--batch_size=8",
         "--test_batch_size=16", "--num_eval=10", "--ch=32", "--num_steps=3", "--num_samples=4",
         "--num_workers=0", "--device=cpu"]


def run(dataset, dataroot, saveroot, *extra):
    argv = [f"--dataset={dataset}", f"--dataroot={dataroot}", f"--saveroot={saveroot}", "--expname=run", *SMALL,
            *extra]
    if dataset == "cifar":
        with fake_cifar10_checksums(os.path.join(dataroot, "cifar10")):
            train_img.main(argv)
    else:
        train_img.main(argv)
    return os.path.join(saveroot, "run")


@pytest.fixture(scope="module", params=["mnist", "cifar"])
def image_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    write_fake_image_dataset(request.param, root / "data")
    run_dir = run(request.param, root / "data", root / "runs", "--debias=True")
    return request.param, root, run_dir


def test_log_metrics_tensorboard_samples_and_checkpoint(image_run):
    dataset, _, run_dir = image_run
    lines = open(os.path.join(run_dir, "log.txt")).read().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "2", "3"]
    assert all(line.startswith("Iteration ") and "loss" in line and "BPD" in line and "±" in line for line in lines)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        metrics = [json.loads(line) for line in fh]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"loss", "bpd", "bpd_std_err", "wall_time"} <= set(m)
        # 10 test images: the standard error is the sample std / sqrt(10), and bpd of a barely trained
        # model is far above the 8 bits of a uniform density but finite.
        assert 8.0 < m["bpd"] < 100 and 0 < m["bpd_std_err"] < m["bpd"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    assert {"loss", "bpd", "bpd_std_err"} <= set(acc.Tags()["scalars"])
    assert "samples" in acc.Tags()["images"]
    with open(os.path.join(run_dir, "samples_0000003.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert state["iteration"] == 3 and state["kind"] == "img"
    assert set(state) >= {"model_state", "ema_state", "optimizer_state", "rng_state", "args"}
    gen_sde = load_model(os.path.join(run_dir, "checkpoint.pt"))
    channels, size = (1, 28) if dataset == "mnist" else (3, 32)
    x = torch.randn(2, channels, size, size)
    assert gen_sde.a(x, torch.rand(2)).shape == x.shape and not gen_sde.training


def test_rerun_resumes_and_continues_the_iteration_count(image_run):
    dataset, root, run_dir = image_run
    run(dataset, root / "data", root / "runs", "--debias=True", "--num_iterations=4")
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "Resuming from" in log and "at iteration 3" in log
    assert log.splitlines()[-1].startswith("Iteration 4 ")


def test_missing_data_is_one_line_naming_the_folder_and_files(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.cifar

    def offline(*args, **kwargs):  # what a download does on a machine without network, at once
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as exit_info:
        train_img.main(["--dataset=cifar", f"--dataroot={tmp_path / 'empty'}", f"--saveroot={tmp_path / 'runs'}",
                        *SMALL])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(tmp_path / "empty" / "cifar10") in err and "data_batch_1" in err
