"""The preconditioned U-Net drift (lib/models/precond.py), the data statistics it is built from (lib.pixels,
lib.image_data.pixel_counts), and train_img.py's flags for it and for the SDE."""
import math

import pytest
import torch

import train_img
from fake_datasets import write_fake_image_dataset
from lib.checkpoint import load_checkpoint, load_model
from lib.image_data import load_image_datasets, pixel_counts
from lib.models.precond import PreconditionedUNet
from lib.oracles import GaussianDrift
from lib.pixels import dequantize, model_space_statistics, to_model_space
from lib.sdes import SubVariancePreservingSDE, VariancePreservingSDE

TINY_UNET = dict(input_channels=1, input_height=8, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())


@pytest.mark.parametrize("sde_cls", [VariancePreservingSDE, SubVariancePreservingSDE])
def test_with_the_network_at_zero_the_drift_is_the_exact_drift_of_gaussian_data(sde_cls):
    """F = 0 (the U-Net's output layer starts at zero) and the skip term leave -g c_in^2 (y - alpha mu): the exact
    drift g grad log p_s of N(mu, sd^2 I) data, for any SDE of the family (closed form: lib.oracles.GaussianDrift)."""
    sde = sde_cls()
    mean, std = -1.1, 1.7
    drift = PreconditionedUNet(TINY_UNET, sde.spec(), mean, std, 0.01).double()
    y = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(drift(y, s), GaussianDrift(sde, mean, std)(y, s), rtol=1e-10, atol=1e-12)


def test_the_network_sees_unit_scale_inputs_and_a_noise_level_in_the_unit_interval():
    sde = VariancePreservingSDE()
    mean, std, scale = 0.4, 2.0, 0.02
    drift = PreconditionedUNet(TINY_UNET, sde.spec(), mean, std, scale).double()
    seen = {}
    drift.net.register_forward_hook(lambda module, args, out: seen.update(y=args[0], t=args[1]))
    x = mean + std * torch.randn(2000, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for s_value in (1e-3, 0.1, 1.0):
        s = torch.full((2000,), s_value, dtype=torch.float64)
        drift(sde.sample(s, x), s)
        assert seen["y"].std().item() == pytest.approx(1.0, abs=0.02)
    s = torch.tensor([0.0, 1e-4, 1e-2, 0.3, 1.0], dtype=torch.float64)
    drift(torch.zeros(5, 1, 8, 8, dtype=torch.float64), s)
    t = seen["t"]
    assert t[0].item() == pytest.approx(0.0, abs=1e-12) and torch.all(t[1:] > t[:-1]) and t[-1].item() <= 1.0


def test_model_space_statistics_match_monte_carlo_of_the_dequantized_logits():
    """mean, std and the root-mean-square spread inside one bin, against 2M dequantized draws."""
    counts = torch.zeros(256)
    counts[0], counts[37], counts[128], counts[255] = 500, 100, 300, 100
    k = torch.multinomial(counts, 2_000_000, replacement=True, generator=torch.Generator().manual_seed(2))
    for real in (True, False):
        z = to_model_space(dequantize(k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)[None],
                           real)[0][0]
        mean, std, scale = model_space_statistics(counts, real)
        assert mean == pytest.approx(z.mean().item(), abs=5 * z.std().item() / math.sqrt(z.numel()))
        assert std == pytest.approx(z.std().item(), rel=2e-3)
        within = torch.stack([z[k == v].var() for v in (0, 37, 128, 255)])  # per-bin variance
        expected = (within * counts[[0, 37, 128, 255]] / counts.sum()).sum().sqrt().item()
        assert scale == pytest.approx(expected, rel=2e-3)
    # Without the logit a bin is uniform of width 1/256: std 1/(256 sqrt 12), which 64 midpoints give to within
    # their own quadrature error, a factor sqrt(1 - 1/64^2) (relative 1.2e-4).
    assert model_space_statistics(counts, False)[2] == pytest.approx(1 / (256 * math.sqrt(12)), rel=2e-4)


def test_pixel_counts_is_the_histogram_of_every_stored_pixel(tmp_path):
    written = write_fake_image_dataset("mnist", tmp_path)
    train_set, _, _ = load_image_datasets("mnist", tmp_path, download=False)
    expected = torch.bincount(torch.from_numpy(written.train_images).reshape(-1).long(), minlength=256)
    assert torch.equal(pixel_counts(train_set), expected)


RUN = ["--dataset=mnist", "--num_iterations=2", "--print_every=2", "--sample_every=100", "--checkpoint_every=2",
       "--batch_size=8", "--test_batch_size=16", "--num_eval=4", "--ch=32", "--num_steps=2", "--num_samples=4",
       "--num_workers=0", "--device=cpu"]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("precond")
    write_fake_image_dataset("mnist", root / "data")
    return root


def test_the_checkpoint_holds_the_training_sets_statistics_and_the_sde(mnist):
    train_img.main([*RUN, f"--dataroot={mnist / 'data'}", f"--saveroot={mnist / 'runs'}", "--expname=subvp",
                    "--sde=subvp"])
    state = load_checkpoint(mnist / "runs" / "subvp" / "checkpoint.pt")
    kwargs = state["model"]["kwargs"]
    train_set, _, _ = load_image_datasets("mnist", mnist / "data", download=False)
    expected = model_space_statistics(pixel_counts(train_set), True)
    assert state["model"]["name"] == "precond_unet" and state["sde"]["name"] == "subvp"
    assert (kwargs["data_mean"], kwargs["data_std"], kwargs["data_scale"]) == pytest.approx(expected, rel=1e-12)
    gen_sde = load_model(mnist / "runs" / "subvp" / "checkpoint.pt")
    assert isinstance(gen_sde.base_sde, SubVariancePreservingSDE) and isinstance(gen_sde.a, PreconditionedUNet)
    assert isinstance(gen_sde.a.sde, SubVariancePreservingSDE)


@pytest.mark.parametrize("flag, saved", [("--sde=vp", "--sde=subvp"), ("--precond=False", "--precond=True")])
def test_resuming_with_another_sde_or_parameterisation_is_refused(mnist, capsys, flag, saved):
    argv = [*RUN, f"--dataroot={mnist / 'data'}", f"--saveroot={mnist / 'runs'}", "--expname=switch"]
    train_img.main([*argv, "--sde=subvp", "--precond=True"])
    with pytest.raises(SystemExit) as exit_info:
        train_img.main([*argv, "--sde=subvp", "--precond=True", flag, "--num_iterations=3"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert f"was written with {saved}, this command has {flag}; pass {saved} to resume" in err


@pytest.mark.parametrize("argv, expected", [
    (["--sde=ve"], "invalid choice: 've'"),
    (["--dropout=-0.1"], "--dropout: must lie in [0, 1)"),
    (["--dropout=1"], "--dropout: must lie in [0, 1)"),
    (["--precond=yes"], "expected True or False"),
    (["--grad_clip=-1"], "--grad_clip: must be a finite number >= 0"),
    (["--warmup=5"], "--warmup=5 outlasts the run (--num_iterations=2)"),
])
def test_bad_recipe_flags_are_refused_in_one_line(mnist, capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        train_img.main([*RUN, f"--dataroot={mnist / 'data'}", f"--saveroot={mnist / 'bad'}", *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code in (1, 2) and len(err.splitlines()) == 1 and expected in err, err
