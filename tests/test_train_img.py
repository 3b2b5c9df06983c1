"""train_img.py end to end on tiny MNIST / CIFAR-10 files in torchvision's own formats, read by its own classes."""
import json
import os
import shutil

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


def metrics_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


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
        assert {"loss", "bpd", "bpd_std_err", "bpd_estimator_std_err", "wall_time"} <= set(m)
        # The fake images are uniform random bytes: no model beats their 8 bits/dim, and the ELBO's bpd bounds
        # the model's from above, so the mean over 10 images stays above 8 - 4 standard errors (the
        # preconditioned network starts as the data's Gaussian, near 8; sdeflow-light's raw drift far above).
        assert 8.0 - 4 * m["bpd_std_err"] < m["bpd"] < 100 and 0 < m["bpd_std_err"] < m["bpd"]
        assert m["bpd_estimator_std_err"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    assert {"loss", "bpd", "bpd_std_err"} <= set(acc.Tags()["scalars"])
    assert "samples" in acc.Tags()["images"]
    with open(os.path.join(run_dir, "samples_0000003.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert state["iteration"] == 3 and state["kind"] == "img"
    assert set(state) >= {"model_state", "ema_state", "optimizer_state", "running_loss", "args"}
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


@pytest.mark.parametrize("image_run", ["cifar"], indirect=True)
def test_the_resumed_run_ends_in_the_state_of_an_uninterrupted_run(image_run):
    """Data order, dequantisation noise, flips, loss noise, EMA and Adam all continue exactly. Checked on
    CIFAR-10, whose path is MNIST's plus the random flips (the kill tests in test_reliability.py cover
    the shared loop)."""
    dataset, root, run_dir = image_run
    straight = run(dataset, root / "data", root / "straight", "--debias=True", "--num_iterations=4")
    resumed, reference = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (run_dir, straight))
    assert resumed["iteration"] == reference["iteration"] == 4
    for part in ("model_state", "ema_state"):
        for name, value in reference[part].items():
            assert torch.equal(resumed[part][name], value), (part, name)
    # The same evaluations at iterations 1, 2 and 4 (the loss logged at 4 differs: the first command's
    # last log line, at 3, started a new average).
    by_iteration = {m["iteration"]: m for m in metrics_of(run_dir)}
    for m in metrics_of(straight):
        skip = {"wall_time"} | ({"loss"} if m["iteration"] == 4 else set())
        assert {k: v for k, v in m.items() if k not in skip} == \
            {k: v for k, v in by_iteration[m["iteration"]].items() if k not in skip}


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


# --- --amp, --compile and --channels_last (one training step checked on the CPU) -----------------


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist_options")
    write_fake_image_dataset("mnist", root / "data")
    return root


def record_convs(monkeypatch, what):
    """[what(conv, its input, its output)] for every convolution the run evaluates (the EMA copy keeps the hooks)."""
    import lib.training

    seen, build = [], lib.training.build_drift

    def build_with_hooks(name, kwargs):
        drift = build(name, kwargs)
        for m in drift.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda mod, inputs, out: seen.append(what(mod, inputs[0], out)))
        return drift

    monkeypatch.setattr(lib.training, "build_drift", build_with_hooks)
    return seen


@pytest.fixture(scope="module")
def float32_run(mnist_root):
    return run("mnist", mnist_root / "data", mnist_root / "float32", "--num_iterations=2", "--sample_every=100")


def test_amp_trains_the_convolutions_in_bf16_and_keeps_weights_and_evaluation_float32(mnist_root, float32_run,
                                                                                      monkeypatch):
    seen = record_convs(monkeypatch, lambda conv, x, out: (conv.training, out.dtype))
    run_dir = run("mnist", mnist_root / "data", mnist_root / "amp", "--num_iterations=2", "--sample_every=100",
                  "--amp=True")
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}  # the training forward
    assert {dtype for training, dtype in seen if not training} == {torch.float32}  # EMA evaluation, sampling
    amp, ref = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (run_dir, float32_run))
    assert amp["model_state"].keys() == ref["model_state"].keys()
    assert all(w.dtype == torch.float32 for w in [*amp["model_state"].values(), *amp["ema_state"].values()])
    # Two bf16 steps later the weights still agree with float32. Adam moves a weight by about lr per step
    # whatever its gradient's size, so where bf16 rounding flips the sign of a near-zero gradient the two runs part
    # by up to 2 lr per step: a tolerance of 4 lr bounds that, and the bulk must agree far more closely.
    with open(os.path.join(run_dir, "args.json")) as fh:
        lr = json.load(fh)["lr"]
    for name, w in ref["model_state"].items():
        torch.testing.assert_close(amp["model_state"][name], w, rtol=0, atol=4 * lr)
    moved = torch.cat([(amp["model_state"][n] - w).flatten() for n, w in ref["model_state"].items()]).abs()
    assert (moved > 0.1 * lr).float().mean() < 0.01
    for a, r in zip(metrics_of(run_dir), metrics_of(float32_run)):
        assert a["loss"] == pytest.approx(r["loss"], rel=1e-2) and a["bpd"] == pytest.approx(r["bpd"], rel=1e-2)


def test_compile_trains_the_compiled_network_and_saves_the_original_one(mnist_root, float32_run, monkeypatch):
    """torch.compile with dynamo's 'eager' backend (graph capture, no code generation: inductor needs
    about 4 minutes for this U-Net on a 2-core CPU; tests/test_train_toy.py runs inductor on the MLP)."""
    compiled, compile_ = [], torch.compile

    def compile_eagerly(model, **kwargs):
        compiled.append(model)
        return compile_(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    run_dir = run("mnist", mnist_root / "data", mnist_root / "compiled", "--num_iterations=2", "--sample_every=100",
                  "--compile=True")
    assert len(compiled) == 1
    state, ref = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (run_dir, float32_run))
    assert state["model_state"].keys() == ref["model_state"].keys()  # no '_orig_mod.' prefixes
    for part in ("model_state", "ema_state"):
        for name, w in ref[part].items():
            torch.testing.assert_close(state[part][name], w, rtol=1e-5, atol=1e-7)
    for a, r in zip(metrics_of(run_dir), metrics_of(float32_run)):
        assert a["loss"] == pytest.approx(r["loss"], rel=1e-6) and a["bpd"] == pytest.approx(r["bpd"], rel=1e-6)


def test_channels_last_runs_every_convolution_in_that_layout_and_learns_the_same(mnist_root, float32_run,
                                                                                monkeypatch):
    cl = torch.channels_last
    layouts = record_convs(monkeypatch, lambda conv, x, out: (conv.training, x.is_contiguous(memory_format=cl),
                                                               out.is_contiguous(memory_format=cl)))
    run_dir = run("mnist", mnist_root / "data", mnist_root / "channels_last", "--num_iterations=2",
                  "--sample_every=100", "--channels_last=True")
    # Inputs too: no layer hands a contiguous tensor on, which would cost a reorder at the next conv.
    assert {training for training, _, _ in layouts} == {True, False}  # the training step and the EMA's evaluation
    assert all(inp and out for _, inp, out in layouts)
    # The same arithmetic up to the order of float32 sums (MNIST's U-Net has no dropout to draw differently).
    for a, r in zip(metrics_of(run_dir), metrics_of(float32_run), strict=True):
        assert a["loss"] == pytest.approx(r["loss"], rel=1e-5) and a["bpd"] == pytest.approx(r["bpd"], rel=1e-5)
    gen_sde = load_model(os.path.join(run_dir, "checkpoint.pt"))  # into a contiguous network, as sample.py does
    ref = load_model(os.path.join(float32_run, "checkpoint.pt"))
    x, s = torch.rand(2, 1, 28, 28), torch.full((2,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(gen_sde.a(x, s), ref.a(x, s), rtol=1e-3, atol=1e-5)


def test_a_run_resumes_in_the_other_memory_format(mnist_root, float32_run):
    """The checkpoint's weights and Adam moments are contiguous; resumed in channels_last, iteration 3
    is the iteration 3 of a contiguous resume, up to the order of float32 sums."""
    resumed, adam = {}, {}
    for layout in ("False", "True"):
        saveroot = mnist_root / f"resumed_channels_last_{layout}"
        shutil.copytree(float32_run, saveroot / "run")
        run_dir = run("mnist", mnist_root / "data", saveroot, "--num_iterations=3", "--sample_every=100",
                      f"--channels_last={layout}")
        resumed[layout] = metrics_of(run_dir)[-1]
        adam[layout] = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["optimizer_state"]
    assert resumed["True"]["iteration"] == resumed["False"]["iteration"] == 3
    assert resumed["True"]["loss"] == pytest.approx(resumed["False"]["loss"], rel=1e-5)
    assert resumed["True"]["bpd"] == pytest.approx(resumed["False"]["bpd"], rel=1e-5)
    # Adam's moments carried on through the change of layout (3 steps' worth, not 1). Compared per tensor
    # against its largest entry, plus 1e-6 of the largest over all tensors: the gradients of the time
    # shifts that a one-channel-per-group GroupNorm erases are rounding noise around an exact zero.
    got, want = adam["True"]["state"], adam["False"]["state"]
    assert got.keys() == want.keys() and all(got[i]["step"] == want[i]["step"] == 3 for i in want)
    for key in ("exp_avg", "exp_avg_sq"):
        scale = max(w[key].abs().max() for w in want.values())
        for i in want:
            err = (got[i][key] - want[i][key]).abs().max()
            assert err <= 1e-3 * want[i][key].abs().max() + 1e-6 * scale, (i, key)


@pytest.mark.parametrize("estimator, method", [("elbo", "elbo_terms"), ("random_t_slice", "elbo_random_t_slice")])
def test_bits_per_dim_come_from_the_chosen_elbo_estimator(mnist_root, monkeypatch, estimator, method):
    """Replace the chosen estimator by the log-density of the uniform distribution on [0, 1)^D, which is 0:
    without the logit transform, bpd = -0 / (D ln 2) + 8 is exactly 8 for every image. (.elbo's strata
    are elbo_terms, (B, K).)"""
    from lib.sdes import PluginReverseSDE

    monkeypatch.setattr(PluginReverseSDE, method, lambda self, x, *times: torch.zeros(x.shape[0], *times,
                                                                                    dtype=x.dtype))
    run_dir = run("mnist", mnist_root / "data", mnist_root / f"estimator_{estimator}", "--num_iterations=1",
                  "--real=False", f"--elbo_estimator={estimator}")
    (m,) = metrics_of(run_dir)
    assert m["bpd"] == 8.0 and m["bpd_std_err"] == 0.0
