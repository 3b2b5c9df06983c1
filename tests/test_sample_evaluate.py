"""sample.py and evaluate.py end to end on tiny toy and image runs, and the evaluation pieces they share.

The runs are trained for a few iterations only: the tests check what the scripts write and that their
figures equal the library's quantities on the same points (or agree within standard errors), not that
the models are good.
"""
import csv
import json
import math
import os

import pytest
import torch
from PIL import Image

import evaluate
import sample
import train_img
import train_toy
from fake_datasets import write_fake_image_dataset
from lib.checkpoint import load_model, save_checkpoint
from lib.evaluation import (ELBO_ESTIMATORS, ODELikelihood, elbo_estimator, mean_and_stderr, repeated_mean,
                            sliced_wasserstein, summarize, test_set_bits_per_dim)
from lib.image_data import load_image_datasets, test_loader
from lib.likelihood import ode_log_likelihood
from lib.pixels import dequantize, logit_transform
from lib.oracles import GaussianDrift, expected_elbo
from lib.sdes import PluginReverseSDE, VariancePreservingSDE
from lib.swiss_roll import sample_swiss_roll, swiss_roll_log_density
from lib.rng import derived_seed, held_out_generator

PNG = b"\x89PNG\r\n\x1a\n"
TOY_EVAL = 200  # the toy run's --num_eval: evaluate.py's default held-out set


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    train_toy.main([f"--saveroot={root}", "--expname=toy", "--num_iterations=50", "--print_every=50",
                    "--checkpoint_every=50", "--sample_every=50", "--num_steps=10", f"--num_eval={TOY_EVAL}",
                    "--elbo_repeats=4", "--num_samples=50", "--width=32", "--depth=1", "--lmbd=0,1", "--warmup=10",
                    "--device=cpu"])
    return os.path.join(root, "toy", "checkpoint.pt")


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    write_fake_image_dataset("mnist", root / "data")
    train_img.main(["--dataset=mnist", f"--dataroot={root / 'data'}", f"--saveroot={root / 'runs'}", "--expname=run",
                    "--num_iterations=2", "--print_every=2", "--sample_every=2", "--checkpoint_every=2",
                    "--batch_size=8", "--test_batch_size=16", "--num_eval=4", "--ch=32", "--num_steps=2",
                    "--num_samples=4", "--num_workers=0", "--device=cpu"])
    return root / "data", os.path.join(root, "runs", "run", "checkpoint.pt")


def read_table(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run_sample(sampler, *argv):
    sample.main([sampler, "--device=cpu", *argv])


def run_evaluate(tmp_path, method, *argv):
    out = tmp_path / "report.json"
    evaluate.main([method, "--device=cpu", f"--output={out}", *argv])
    with open(out) as fh:
        return json.load(fh)


def one_line_error(capsys, main, argv):
    """Run a script's main expecting a refusal: non-zero exit, one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def held_out_points(n=TOY_EVAL, noise=0.5):
    return sample_swiss_roll(n, noise, held_out_generator())


# --- sample.py on the toy --------------------------------------------------------------------------


def test_toy_em_sweep_writes_a_png_per_lambda_and_the_table(toy_ckpt, tmp_path, capsys):
    run_sample("em", f"--checkpoint={toy_ckpt}", "--lmbd=0,0.5,1", "--num_steps=20", "--num_samples=300",
               f"--outdir={tmp_path}")
    for name in ("lambda_0.png", "lambda_0.5.png", "lambda_1.png"):
        with open(tmp_path / name, "rb") as fh:
            assert fh.read(8) == PNG, name
    rows = read_table(tmp_path / "samples.csv")
    assert list(rows[0]) == ["lambda", "sampler", "steps", "nfe", "seconds", "sliced_wasserstein",
                             "sliced_wasserstein_floor"]
    assert [float(r["lambda"]) for r in rows] == [0.0, 0.5, 1.0]
    for r in rows:
        assert r["sampler"] == "em" and r["steps"] == "20"
        assert int(r["nfe"]) == 20  # one network evaluation per Euler-Maruyama step
        assert float(r["seconds"]) > 0
        assert 0 < float(r["sliced_wasserstein_floor"]) < float(r["sliced_wasserstein"]) < math.inf
    assert len({r["sliced_wasserstein_floor"] for r in rows}) == 1  # one reference for the whole sweep
    printed = capsys.readouterr().out
    assert "sliced_wasserstein" in printed and len([line for line in printed.splitlines() if " em " in line]) == 3


def test_toy_lambda_gives_the_same_samples_in_any_list(toy_ckpt, tmp_path):
    run_sample("em", f"--checkpoint={toy_ckpt}", "--lmbd=0,0.5", "--num_steps=10", "--num_samples=100",
               f"--outdir={tmp_path / 'list'}")
    run_sample("em", f"--checkpoint={toy_ckpt}", "--lmbd=0.5", "--num_steps=10", "--num_samples=100",
               f"--outdir={tmp_path / 'alone'}")
    in_list = read_table(tmp_path / "list" / "samples.csv")[1]
    alone = read_table(tmp_path / "alone" / "samples.csv")[0]
    assert in_list["sliced_wasserstein"] == alone["sliced_wasserstein"]


def test_toy_ode_sampler_counts_its_evaluations_and_the_denoising_step(toy_ckpt, tmp_path):
    for denoise in ("True", "False"):
        run_sample("ode", f"--checkpoint={toy_ckpt}", "--num_samples=100", f"--denoise={denoise}",
                   f"--outdir={tmp_path / denoise}")
    rows = {d: read_table(tmp_path / d / "samples.csv") for d in ("True", "False")}
    assert all(len(r) == 1 and r[0]["lambda"] == "1.0" and r[0]["steps"] == "adaptive" for r in rows.values())
    nfe = {d: int(r[0]["nfe"]) for d, r in rows.items()}
    assert nfe["False"] > 10 and nfe["True"] == nfe["False"] + 1  # Tweedie's step is one more evaluation
    with open(tmp_path / "True" / "lambda_1.png", "rb") as fh:
        assert fh.read(8) == PNG


def test_toy_pc_sampler_counts_predictor_corrector_and_denoising_evaluations(toy_ckpt, tmp_path):
    run_sample("pc", f"--checkpoint={toy_ckpt}", "--num_steps=10", "--n_corrector=2", "--num_samples=50",
               f"--outdir={tmp_path}")
    (row,) = read_table(tmp_path / "samples.csv")
    assert row["lambda"] == "0.0" and row["sampler"] == "pc" and row["steps"] == "10"
    assert int(row["nfe"]) == 10 * (1 + 2) + 1


def test_default_outdir_is_inside_the_run_folder(toy_ckpt):
    run_sample("em", f"--checkpoint={toy_ckpt}", "--lmbd=1", "--num_steps=5", "--num_samples=20")
    folder = os.path.join(os.path.dirname(toy_ckpt), "samples_em")
    assert sorted(os.listdir(folder)) == ["lambda_1.png", "samples.csv"]


# --- sample.py on images -----------------------------------------------------------------------------


def test_image_sweep_writes_grids_and_a_table_without_a_toy_distance(mnist_run, tmp_path):
    _, ckpt = mnist_run
    run_sample("em", f"--checkpoint={ckpt}", "--lmbd=0,1", "--num_steps=3", "--num_samples=4", f"--outdir={tmp_path}")
    rows = read_table(tmp_path / "samples.csv")
    assert list(rows[0]) == ["lambda", "sampler", "steps", "nfe", "seconds"]
    assert [(r["lambda"], r["nfe"]) for r in rows] == [("0.0", "3"), ("1.0", "3")]
    for name in ("lambda_0.png", "lambda_1.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size == (2 * 28 + 3 * 2,) * 2  # 2 x 2 grid, 2-pixel padding


def test_image_ode_sampler_reports_a_positive_nfe(mnist_run, tmp_path):
    _, ckpt = mnist_run
    run_sample("ode", f"--checkpoint={ckpt}", "--rtol=1e-2", "--atol=1e-2", "--num_samples=2",
               f"--outdir={tmp_path}")
    (row,) = read_table(tmp_path / "samples.csv")
    assert int(row["nfe"]) > 0 and float(row["seconds"]) > 0
    with open(tmp_path / "lambda_1.png", "rb") as fh:
        assert fh.read(8) == PNG


# --- sample.py refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["em", "--lmbd=0,x"], "each lambda must be a number in [0, 1]"),
    (["em", "--lmbd=0,1.5"], "each lambda must be a number in [0, 1]"),
    (["em", "--lmbd=0,,1"], "comma-separated"),
    (["em", "--lmbd=0.5,0.5"], "more than once"),
    (["ddim"], "invalid choice: 'ddim'"),
    (["pc", "--lmbd=0.5"], "unrecognized arguments: --lmbd=0.5"),
    (["ode", "--lmbd=1"], "unrecognized arguments: --lmbd=1"),
    (["ode", "--num_steps=100"], "unrecognized arguments: --num_steps=100"),
    (["em", "--snr=0.1"], "unrecognized arguments: --snr=0.1"),
    (["em", "--rtol=1e-3"], "unrecognized arguments: --rtol=1e-3"),
    (["pc", "--denoise=yes"], "expected True or False"),
    (["--sampler=pc"], "the following arguments are required"),
])
def test_sample_refuses_bad_options_in_one_line(toy_ckpt, capsys, argv, expected):
    err = one_line_error(capsys, sample.main, [*argv, f"--checkpoint={toy_ckpt}", "--device=cpu"])
    assert expected in err


@pytest.mark.parametrize("main, command, expected", [
    (sample.main, "em", ["--lmbd", "(default: [0.0, 0.25, 0.5, 0.75, 1.0])", "--num_steps", "(default: 1000)"]),
    (sample.main, "pc", ["--snr", "(default: 0.16)", "--n_corrector", "(default: 1)", "(default: reverse_diffusion)"]),
    (sample.main, "ode", ["--rtol", "(default: 1e-05)", "--denoise", "(default: True)"]),
    (evaluate.main, "elbo", ["--estimator", "(default: elbo)", "--elbo_repeats", "the run's --elbo_repeats"]),
    (evaluate.main, "ode", ["--divergence", "rademacher for images", "--atol", "(default: 1e-05)"]),
])
def test_each_subcommand_lists_only_its_own_flags_with_their_defaults(capsys, main, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(e in text for e in expected), text
    others = {"em": ["--snr", "--rtol"], "pc": ["--lmbd", "--rtol"], "ode": ["--lmbd", "--num_steps", "--snr"],
              "elbo": ["--divergence", "--rtol"]}.get(command, ["--estimator", "--elbo_repeats"])
    assert not any(flag in text for flag in others)


def test_sample_and_evaluate_refuse_a_missing_checkpoint(tmp_path, capsys):
    for main, command in ((sample.main, "em"), (evaluate.main, "elbo")):
        err = one_line_error(capsys, main, [command, f"--checkpoint={tmp_path / 'nowhere.pt'}", "--device=cpu"])
        assert "no checkpoint at" in err and "nowhere.pt" in err


@pytest.mark.parametrize("content, expected", [(b"\x00 not a checkpoint" * 10, "not a readable checkpoint"),
                                               (None, "not an sdeflow checkpoint")])
def test_sample_and_evaluate_refuse_a_file_that_is_not_a_checkpoint(tmp_path, capsys, content, expected):
    path = tmp_path / "file.pt"
    if content is None:
        torch.save({"weights": torch.ones(2)}, path)  # a readable torch file, but not a run's checkpoint
    else:
        path.write_bytes(content)
    for main, command in ((sample.main, "em"), (evaluate.main, "elbo")):
        assert expected in one_line_error(capsys, main, [command, f"--checkpoint={path}", "--device=cpu"])


# --- evaluate.py on the toy --------------------------------------------------------------------------


def test_toy_ode_evaluation_is_the_exact_likelihood_of_the_held_out_points(toy_ckpt, tmp_path, capsys):
    report = run_evaluate(tmp_path, "ode", f"--checkpoint={toy_ckpt}")
    x = held_out_points()
    log_p, nfe = ode_log_likelihood(load_model(toy_ckpt), x)
    truth = swiss_roll_log_density(x, 0.5)
    assert report["num_points"] == TOY_EVAL and report["unit"] == "nats"
    assert report["ode"] == pytest.approx(log_p.double().mean().item(), abs=1e-9)
    assert report["ode_std_err"] == pytest.approx(log_p.double().std().item() / math.sqrt(TOY_EVAL), rel=1e-6)
    assert report["true_log_likelihood"] == pytest.approx(truth.mean().item(), abs=1e-12)
    assert report["ode_gap"] == pytest.approx(report["ode"] - report["true_log_likelihood"], abs=1e-9)
    assert report["ode_nfe_mean"] == nfe > 0 and report["divergence"] == "exact"
    # The same held-out set and solve as the training log's final evaluation.
    with open(os.path.join(os.path.dirname(toy_ckpt), "metrics.jsonl")) as fh:
        assert report["ode"] == pytest.approx(json.loads(fh.readlines()[-1])["ode"], abs=1e-6)
    line = capsys.readouterr().out.strip()
    assert "±" in line and "nats" in line and "mean NFE" in line and "gap" in line


def test_toy_hutchinson_ode_evaluation_is_near_the_exact_one(toy_ckpt, tmp_path):
    """One probe per point: the paired difference to the exact divergence averages out within its errors
    (4 combined standard errors; the Hutchinson noise is small against the spread over points)."""
    exact = run_evaluate(tmp_path, "ode", f"--checkpoint={toy_ckpt}")
    probe = run_evaluate(tmp_path, "ode", f"--checkpoint={toy_ckpt}", "--divergence=gaussian")
    assert probe["divergence"] == "gaussian"
    assert abs(probe["ode"] - exact["ode"]) < 4 * math.hypot(probe["ode_std_err"], exact["ode_std_err"])


@pytest.mark.parametrize("estimator", ["random_t_slice", "elbo"])
def test_toy_elbo_evaluation_agrees_with_the_training_estimate(toy_ckpt, tmp_path, estimator):
    """evaluate.py's ELBO and an independent one (sdeflow-light's random t slices,
    another seed, 16 draws per point) estimate the same mean: they differ by less than 4 combined standard
    errors (conservative: both share the spread over the same points). The truth is the quadrature's."""
    report = run_evaluate(tmp_path, "elbo", f"--checkpoint={toy_ckpt}", f"--estimator={estimator}", "--seed=3")
    assert report["estimator"] == estimator and report["elbo_repeats"] == 4  # the run's own --elbo_repeats
    torch.manual_seed(12345)
    other = repeated_mean(load_model(toy_ckpt).elbo_random_t_slice, held_out_points(), 16)
    other_se = other.std().item() / math.sqrt(TOY_EVAL)
    assert abs(report["elbo"] - other.mean().item()) < 4 * math.hypot(report["elbo_std_err"], other_se)
    assert report["true_log_likelihood"] == pytest.approx(swiss_roll_log_density(held_out_points(), 0.5).mean().item())
    assert report["elbo_gap"] == pytest.approx(report["elbo"] - report["true_log_likelihood"], abs=1e-9)
    assert 0 < report["elbo_gap_std_err"] and "ode_nfe_mean" not in report


def test_default_estimator_is_the_elbo_method(toy_ckpt, tmp_path):
    report = run_evaluate(tmp_path, "elbo", f"--checkpoint={toy_ckpt}", "--num_eval=50")
    assert report["estimator"] == "elbo" and report["num_points"] == 50


# --- evaluate.py on images ----------------------------------------------------------------------------


def test_image_ode_bpd_is_the_likelihood_of_the_dequantized_logit_images(mnist_run, tmp_path, capsys):
    """bpd = -(log p_ODE(z) + log|dz/dx|) / (D ln 2) + 8 with x = (k + u) / 256, z = logit(0.05 + 0.9 x),
    recomputed here from the first 2 test images with the dequantisation and probe seeds evaluate.py documents."""
    dataroot, ckpt = mnist_run
    report = run_evaluate(tmp_path, "ode", f"--checkpoint={ckpt}", "--num_eval=2", "--rtol=5e-2",
                          "--atol=5e-2")
    assert report["num_images"] == 2 and report["unit"] == "bits/dim" and report["divergence"] == "rademacher"
    k = torch.stack([load_image_datasets("mnist", dataroot)[1][i][0] for i in range(2)])  # (2, 1, 28, 28) uint8
    gen_sde = load_model(ckpt)  # before seeding: building the network draws initial weights from the global RNG
    torch.manual_seed(derived_seed(0, 0, 0))  # batch 0's ELBO / probe stream
    x = dequantize(k, generator=torch.Generator().manual_seed(derived_seed(0, 0, 1)))
    z, logdet = logit_transform(x, 0.05)
    log_p, nfe = ode_log_likelihood(gen_sde, z, rtol=5e-2, atol=5e-2, vtype="rademacher")
    bpd = -(log_p.double() + logdet.double()) / (28 * 28 * math.log(2)) + 8
    assert report["bpd"] == pytest.approx(bpd.mean().item(), abs=1e-5)
    assert report["ode_nfe_mean"] == nfe > 0
    assert "bits/dim" in capsys.readouterr().out


def test_image_elbo_bpd_respects_the_entropy_of_uniform_pixels(mnist_run, tmp_path):
    """The fake images are uniform random bytes, so x = (k + u) / 256 is uniform on the cube: no model beats
    8 bits/dim, and the ELBO's bpd is an upper bound on the model's. Mean > 8 - 3 standard errors."""
    _, ckpt = mnist_run
    report = run_evaluate(tmp_path, "elbo", f"--checkpoint={ckpt}", "--estimator=random_t_slice", "--test_batch_size=5")
    assert report["num_images"] == 32 and report["dataset"] == "mnist"  # the whole fake test set
    assert report["bpd"] > 8 - 3 * report["bpd_std_err"] and report["bpd_std_err"] > 0


def test_image_elbo_report_holds_every_images_bpd_and_the_estimators_share(mnist_run, tmp_path, capsys):
    """The JSON report has each test image's bits/dim (their mean is the reported one) and, for the stratified
    ELBO, the estimator's own share of the standard error; the printed line says both."""
    _, ckpt = mnist_run
    report = run_evaluate(tmp_path, "elbo", f"--checkpoint={ckpt}", "--num_times=8", "--num_eval=12")
    per_image = torch.tensor(report["bpd_per_image"], dtype=torch.float64)
    assert per_image.shape == (12,) and report["num_times"] == 8
    assert report["bpd"] == pytest.approx(per_image.mean().item(), rel=1e-12)
    assert report["bpd_std_err"] == pytest.approx(per_image.std().item() / math.sqrt(12), rel=1e-9)
    assert report["bpd_estimator_std_err"] > 0
    assert "of which the estimator's noise" in capsys.readouterr().out


def test_missing_image_data_is_a_one_line_error_naming_the_folder(mnist_run, tmp_path, capsys, monkeypatch):
    import torchvision.datasets.mnist

    def offline(*args, **kwargs):  # what a download does on a machine without network, at once
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    _, ckpt = mnist_run
    err = one_line_error(capsys, evaluate.main, ["elbo", f"--checkpoint={ckpt}", "--device=cpu",
                                                 "--estimator=random_t_slice", f"--dataroot={tmp_path / 'empty'}"])
    assert "MNIST not found" in err and str(tmp_path / "empty") in err


@pytest.mark.parametrize("argv, expected", [
    (["exact"], "invalid choice: 'exact'"),
    (["elbo", "--estimator=importance"], "invalid choice: 'importance'"),
    (["ode", "--estimator=random_t_slice"], "unrecognized arguments: --estimator=random_t_slice"),
    (["elbo", "--divergence=exact"], "unrecognized arguments: --divergence=exact"),
    (["elbo", "--num_eval=0"], "positive integer"),
])
def test_evaluate_refuses_bad_options_in_one_line(toy_ckpt, capsys, argv, expected):
    assert expected in one_line_error(capsys, evaluate.main, [*argv, f"--checkpoint={toy_ckpt}", "--device=cpu"])


def test_evaluate_refuses_image_options_for_the_toy_and_too_many_test_images(toy_ckpt, mnist_run, capsys):
    err = one_line_error(capsys, evaluate.main, ["elbo", f"--checkpoint={toy_ckpt}", "--dataroot=data",
                                                 "--device=cpu"])
    assert "--dataroot applies to image runs" in err
    _, ckpt = mnist_run
    err = one_line_error(capsys, evaluate.main, ["elbo", f"--checkpoint={ckpt}", "--num_eval=1000", "--device=cpu",
                                                 "--estimator=random_t_slice"])
    assert "--num_eval=1000 exceeds the 32 test images" in err


# --- lib.evaluation ---------------------------------------------------------------------------------


def gaussian_gen_sde(mean=0.5, std=0.6):
    sde = VariancePreservingSDE()
    return PluginReverseSDE(sde, GaussianDrift(sde, mean, std), sde.T).eval()


def test_repeated_elbo_averages_to_the_closed_form_within_its_standard_error():
    """Gaussian data with the exact drift: E[ELBO(x)] is known per point (tests/oracles.py). 4000 random t
    slices per point: the average lies within 4 standard errors of it, and equals the mean of the tiled rows."""
    gen = gaussian_gen_sde()
    x = 0.5 + 0.6 * torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    rows = gen.elbo_random_t_slice(x.repeat(4000, 1)).view(4000, 5)
    torch.manual_seed(1)
    assert torch.allclose(repeated_mean(gen.elbo_random_t_slice, x, 4000), rows.mean(0))  # one call, same draws
    se = rows.std(0) / math.sqrt(4000)
    expected = expected_elbo(gen.base_sde, x, 0.5, 0.6)
    assert ((rows.mean(0) - expected).abs() < 4 * se).all()
    chunked = repeated_mean(gen.elbo_random_t_slice, x, 4000, chunk=3000)  # other draws, the same law
    assert ((chunked - expected).abs() < 4 * se).all()


def test_elbo_estimator_names_map_to_the_sde_methods():
    gen = gaussian_gen_sde()
    assert elbo_estimator(gen, "random_t_slice") == gen.elbo_random_t_slice
    with pytest.raises(ValueError, match="random_t_slice"):
        elbo_estimator(gen, "exact")
    assert set(ELBO_ESTIMATORS) == {"elbo", "random_t_slice"}


def test_ode_likelihood_records_the_nfe_of_every_solve():
    gen = gaussian_gen_sde()
    estimate = ODELikelihood(gen)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    log_p = estimate(x)
    expected, nfe = ode_log_likelihood(gen, x)
    estimate(x[:2])
    assert torch.equal(log_p, expected) and len(estimate.nfe) == 2 and estimate.nfe[0] == nfe


@pytest.mark.parametrize("real", [True, False])
def test_test_set_bpd_of_the_uniform_density_is_exactly_8(tmp_path, real):
    """A model whose density is 1 on the cube [0, 1)^D in pixel space scores 8 bits/dim on any images.
    Without the logit it is log p = 0; seen through the logit it is log p_Z(z) = -log|dz/dx|."""
    write_fake_image_dataset("mnist", tmp_path)
    _, test_set, _ = load_image_datasets("mnist", tmp_path, download=False)
    loader = test_loader(test_set, 10)

    def uniform_log_density(z):
        if not real:
            return torch.zeros(z.shape[0])
        return -logit_transform((torch.sigmoid(z.double()) - 0.05) / 0.9, 0.05)[1]

    bpd = test_set_bits_per_dim(uniform_log_density, loader, real, torch.device("cpu"))
    assert bpd.shape == (32,) and bpd.dtype == torch.float64
    assert torch.allclose(bpd, torch.full_like(bpd, 8.0), atol=1e-5)


def test_summarize_pairs_the_gap_per_example():
    values = torch.tensor([1.0, 2.0, 4.0])
    truth = torch.tensor([0.5, 1.5, 3.5])
    s = summarize("ode", values, truth)
    assert s["ode"] == pytest.approx(7 / 3) and s["ode_gap"] == pytest.approx(0.5) and s["ode_gap_std_err"] == 0


def test_sliced_wasserstein_is_small_for_one_distribution_and_the_shift_for_a_translate():
    """Two samples of N(0, I) (2000 points each): SW2 ~ 0.06, the sampling noise. A translate by delta
    (|delta| = 1): each projection moves by theta . delta, so SW2^2 = E (theta . delta)^2 = |delta|^2 / 2 in 2-D
    (within 4% with 1024 directions: the Monte Carlo error over directions is 1.1%)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    delta = torch.tensor([0.6, 0.8])

    def sw(x, y, n=256):
        return sliced_wasserstein(x, y, n, torch.Generator().manual_seed(0)).item()

    assert sw(a, b) < 0.1
    assert sw(a, b + delta) > 0.6
    assert sw(a, a + delta, 1024) == pytest.approx(1 / math.sqrt(2), rel=0.04)
    assert sw(a, b) == pytest.approx(sw(b, a), rel=1e-12)


def test_sliced_wasserstein_compares_empirical_distributions_of_any_sizes():
    a = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    assert sliced_wasserstein(a, a.repeat(3, 1), 64, gen).item() == 0.0  # the same empirical distribution
    assert sliced_wasserstein(a, a[torch.randperm(300)], 64, gen).item() == 0.0
    # Two point masses at 0 and 1 in 1-D: W2 = 1 for every direction (D = 1 has the directions +-1).
    assert sliced_wasserstein(torch.zeros(3, 1), torch.ones(7, 1), 8, gen).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 3))


def test_mean_and_stderr_is_the_mean_and_sample_std_over_root_n():
    mean, se = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_and_stderr([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]) == (mean, se)
    assert math.isnan(mean_and_stderr(torch.tensor([3.0]))[1])
    with pytest.raises(ValueError):
        mean_and_stderr([])


# --- the tools on bad input (issue 16) ----------------------------------------------------------------


def checkpoint_edited(source, path, edit):
    """A copy of the checkpoint at `source`, changed by edit(state), saved (atomically, as training does) at `path`."""
    state = torch.load(source, weights_only=True)
    edit(state)
    save_checkpoint(str(path), {k: v for k, v in state.items() if k not in ("format", "version")})
    return path


def set_version(version):
    def edit(state):
        state["version"] = version

    return edit


def refuse_both(capsys, path, *extra):
    """sample.py em and evaluate.py elbo on the checkpoint at `path`: each must refuse it in one line."""
    return [one_line_error(capsys, main, [command, f"--checkpoint={path}", "--device=cpu", *extra])
            for main, command in ((sample.main, "em"), (evaluate.main, "elbo"))]


def test_a_checkpoint_from_a_newer_version_of_the_code_is_refused_with_what_to_do(toy_ckpt, tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    state = torch.load(toy_ckpt, weights_only=True)
    torch.save({**state, "version": 2}, path)
    for err in refuse_both(capsys, path):
        assert err.endswith(f"{path} was written by a newer version of this code (checkpoint version 2, this code "
                            "reads 1): update the code"), err


@pytest.mark.parametrize("damage", ["truncated", "unknown_network", "wrong_shapes", "no_sde"])
def test_a_truncated_or_damaged_checkpoint_is_refused_in_one_line(toy_ckpt, tmp_path, capsys, damage):
    path = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        data = open(toy_ckpt, "rb").read()
        path.write_bytes(data[:len(data) // 2])
        expected = "is not a readable checkpoint"
    else:
        edits = {"unknown_network": lambda s: s["model"].update(name="transformer"),
                 "wrong_shapes": lambda s: s["model"]["kwargs"].update(width=48),
                 "no_sde": lambda s: s.pop("sde")}
        checkpoint_edited(toy_ckpt, path, edits[damage])
        expected = "does not describe a model this code can build"
    for err in refuse_both(capsys, path):
        assert str(path) in err and expected in err, err


def test_a_wrong_data_folder_is_refused_in_one_line(mnist_run, tmp_path, capsys, monkeypatch):
    import torchvision.datasets.mnist

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable")))
    _, ckpt = mnist_run
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    write_fake_image_dataset("cifar", tmp_path / "cifar_only")  # another data set's files
    for dataroot in (a_file, tmp_path / "cifar_only"):
        err = one_line_error(capsys, evaluate.main, ["elbo", f"--checkpoint={ckpt}", "--device=cpu",
                                                     f"--dataroot={dataroot}"])
        assert "MNIST not found" in err and str(dataroot) in err and "download" in err, err


def test_an_output_that_cannot_be_written_is_refused_before_any_work(toy_ckpt, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the output path should have been refused before any work")

    monkeypatch.setattr(evaluate, "evaluate", no_work)
    monkeypatch.setattr(sample, "sweep", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    err = one_line_error(capsys, evaluate.main, ["elbo", f"--checkpoint={toy_ckpt}", "--device=cpu",
                                                 f"--output={a_file / 'report.json'}"])
    assert f"--output={a_file / 'report.json'} cannot be written (Not a directory)" in err
    err = one_line_error(capsys, evaluate.main, ["elbo", f"--checkpoint={toy_ckpt}", "--device=cpu",
                                                 f"--output={tmp_path}"])
    assert f"--output={tmp_path} is a folder" in err
    err = one_line_error(capsys, sample.main, ["em", f"--checkpoint={toy_ckpt}", "--device=cpu",
                                               f"--outdir={a_file / 'samples'}"])
    assert f"--outdir={a_file / 'samples'} cannot be written (Not a directory)" in err


def fail_writes_of(monkeypatch, part):
    """Writes to files whose name contains `part` fail as on a full disk (at the first write)."""
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.fh.close()

    def failing_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        return Full(fh) if writing and part in os.path.basename(os.fspath(file)) else fh

    monkeypatch.setattr(builtins, "open", failing_open)


def test_a_failed_write_leaves_no_half_written_output(toy_ckpt, tmp_path, capsys, monkeypatch):
    """The disk fills while sample.py writes its table, then while it writes its second figure, then while
    evaluate.py writes its --output: what was written whole stays, nothing is left half-written (no partial
    file under the final name or beside it)."""
    argv = ["em", f"--checkpoint={toy_ckpt}", "--device=cpu", "--lmbd=0,1", "--num_steps=5", "--num_samples=20"]
    fail_writes_of(monkeypatch, "samples")
    err = one_line_error(capsys, sample.main, [*argv, f"--outdir={tmp_path / 'a'}"])
    assert err == (f"sample.py: error: cannot write {tmp_path / 'a' / 'samples.csv'} (No space left on device); "
                   "free space or pick another --outdir")
    assert sorted(os.listdir(tmp_path / "a")) == ["lambda_0.png", "lambda_1.png"]
    for name in ("lambda_0.png", "lambda_1.png"):
        with open(tmp_path / "a" / name, "rb") as fh:
            assert fh.read(8) == PNG

    monkeypatch.undo()
    fail_writes_of(monkeypatch, "lambda_1")
    err = one_line_error(capsys, sample.main, [*argv, f"--outdir={tmp_path / 'b'}"])
    assert err == (f"sample.py: error: cannot write {tmp_path / 'b' / 'lambda_1.png'} (No space left on device); "
                   "free space or pick another --outdir")
    assert os.listdir(tmp_path / "b") == ["lambda_0.png"]

    monkeypatch.undo()
    fail_writes_of(monkeypatch, "report")
    out = tmp_path / "report.json"
    err = one_line_error(capsys, evaluate.main, ["elbo", f"--checkpoint={toy_ckpt}", "--device=cpu", "--num_eval=20",
                                                 f"--output={out}"])
    assert err.startswith(f"evaluate.py: error: cannot write {out} (No space left on device); the report was: ELBO")
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


@pytest.fixture(scope="module")
def broken_toy_ckpt(toy_ckpt, tmp_path_factory):
    """The toy run's checkpoint with NaN weights: its network's outputs are all NaN."""
    def poison(state):
        for part in ("model_state", "ema_state"):
            state[part] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                           for k, v in state[part].items()}

    return checkpoint_edited(toy_ckpt, tmp_path_factory.mktemp("broken") / "checkpoint.pt", poison)


@pytest.mark.parametrize("argv, expected", [
    (["elbo"], "the ELBO is not finite for 200 of the 200 examples of a batch"),
    (["ode"], "the adaptive ODE solve stopped: its step size underflowed"),
])
def test_evaluating_a_model_with_non_finite_outputs_is_one_line_and_writes_nothing(broken_toy_ckpt, tmp_path, capsys,
                                                                                  argv, expected):
    out = tmp_path / "report.json"
    err = one_line_error(capsys, evaluate.main, [*argv, f"--checkpoint={broken_toy_ckpt}", "--device=cpu",
                                                 f"--output={out}"])
    assert expected in err and ("earlier checkpoint" in err or "check the checkpoint" in err), err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, expected", [
    (["em", "--lmbd=0,1", "--num_steps=5"], "the em sampler at λ=0 gave 20 of 20 samples with non-finite values"),
    (["pc", "--num_steps=5"], "the pc sampler at λ=0 gave 20 of 20 samples with non-finite values"),
    (["ode"], "the adaptive ODE solve stopped: its step size underflowed"),
])
def test_sampling_a_model_with_non_finite_outputs_is_one_line_and_writes_nothing(broken_toy_ckpt, tmp_path, capsys,
                                                                                argv, expected):
    err = one_line_error(capsys, sample.main, [*argv, f"--checkpoint={broken_toy_ckpt}", "--device=cpu",
                                               "--num_samples=20", f"--outdir={tmp_path / 's'}"])
    assert expected in err, err
    assert os.listdir(tmp_path / "s") == []


# --- memory bounded by the batch, NFE per example (issue 16) -----------------------------------------


class RowCounter(torch.nn.Module):
    """Wraps a drift network and records how many rows each call gets."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, []

    def forward(self, y, s):
        self.rows.append(y.shape[0])
        return self.net(y, s)


@pytest.mark.parametrize("estimator", list(ELBO_ESTIMATORS))
def test_repeated_elbo_of_images_calls_the_network_on_one_batch_at_most(estimator):
    """Peak memory follows the rows per network call (with their backward pass): it must stay at the batch size
    however many repeats are averaged, not grow to repeats x batch."""
    sde = VariancePreservingSDE()
    counter = RowCounter(GaussianDrift(sde, 0.5, 0.6))
    gen = PluginReverseSDE(sde, counter, sde.T).eval()
    x = torch.rand(3, 1, 8, 8)
    for repeats in (1, 4, 20):
        counter.rows.clear()
        values = elbo_estimator(gen, estimator, repeats)(x)
        assert values.shape == (3,) and torch.isfinite(values).all()
        assert max(counter.rows) <= 3, (repeats, counter.rows)


def test_the_toy_keeps_its_repeats_in_few_large_calls():
    """Flat (N, 2) points: up to 50,000 rows per call, so 2000 points x 64 draws take 3 calls."""
    calls = []

    def estimate(rows):
        calls.append(rows.shape[0])
        return rows.sum(1)

    x = torch.randn(2000, 2)
    mean = repeated_mean(estimate, x, 64)
    assert calls == [50_000, 50_000, 28_000]
    assert torch.allclose(mean, x.sum(1))


@pytest.mark.parametrize("argv", [["elbo", "--estimator=random_t_slice", "--elbo_repeats=10"],
                                  ["elbo", "--elbo_repeats=10", "--num_times=1"],
                                  ["ode", "--rtol=1e-2", "--atol=1e-2"]])
def test_evaluate_calls_the_network_on_one_test_batch_at_most(mnist_run, tmp_path, monkeypatch, argv):
    import lib.saved_run

    rows, load_run = [], lib.saved_run.load_run

    def counted(path, map_location="cpu"):
        gen_sde, state = load_run(path, map_location)
        gen_sde.a.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
        return gen_sde, state

    monkeypatch.setattr(lib.saved_run, "load_run", counted)
    _, ckpt = mnist_run
    report = run_evaluate(tmp_path, argv[0], f"--checkpoint={ckpt}", "--num_eval=4", "--test_batch_size=2", *argv[1:])
    assert report["num_images"] == 4 and rows and max(rows) <= 2, rows


def test_the_mean_nfe_is_per_example_so_a_short_last_batch_weighs_what_it_holds(toy_ckpt, tmp_path, monkeypatch):
    """Batches of 4 and 1 points whose solves take 10 and 40 evaluations: 16 per point, not 25 per solve."""
    import lib.evaluation

    def solve(gen_sde, x, **kwargs):
        return torch.zeros(x.shape[0]), {4: 10, 1: 40}[x.shape[0]]

    monkeypatch.setattr(lib.evaluation, "ode_log_likelihood", solve)
    report = run_evaluate(tmp_path, "ode", f"--checkpoint={toy_ckpt}", "--num_eval=5", "--test_batch_size=4")
    assert report["ode_solves"] == 2 and report["ode_nfe_mean"] == 16
