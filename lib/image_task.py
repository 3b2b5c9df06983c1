"""The image task (MNIST, CIFAR-10) for the shared training loop: data, bits/dim evaluation, sample grids.

Data path (DESIGN.md section 5): integer pixels k -> x = (k + u) / 256 -> with --real=True,
z = logit(alpha + (1 - 2 alpha) x) and its log-determinant. The SDE runs on z (or on x), and

    bpd = -(ELBO(z) + log|dz/dx|) / (D ln 2) + 8,

with the ELBO from PluginReverseSDE.elbo (default) or sdeflow-light's elbo_random_t_slice
(--elbo_estimator=random_t_slice): both unbiased, the first with far less variance (benchmarks/elbo_variance.py).
"""
import math
from functools import partial

import torch
from torchvision.utils import make_grid

from lib.config import ConfigError
from lib.evaluation import elbo_estimator, test_set_bits_per_dim
from lib.image_data import dequantize, load_image_datasets, random_hflip, test_loader, train_loader
from lib.likelihood import logit_transform, mean_and_stderr
from lib.samplers import sample_lambda
from lib.training import EVALUATION, TRAINING_DATA, Task, derived_seed

LOGIT_ALPHA = 0.05

# U-Net per data set (Ho et al. 2020 for CIFAR-10; a smaller one for MNIST).
UNET = {
    "mnist": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0),
    "cifar": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
}


def to_model_space(x, real):
    """Dequantized x in [0, 1) -> (data the SDE runs on, log|d data / d x| (B,))."""
    if real:
        return logit_transform(x, LOGIT_ALPHA)
    return x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def to_image(z, real):
    """Inverse of to_model_space for viewing: model space -> [0, 1]."""
    if real:
        z = (torch.sigmoid(z) - LOGIT_ALPHA) / (1 - 2 * LOGIT_ALPHA)
    return z.clamp(0, 1)


def make_image_task(args, rank=0, world_size=1):
    train_set, test_set, info = load_image_datasets(args.dataset, args.dataroot)
    if args.batch_size > len(train_set):
        raise ConfigError(f"--batch_size={args.batch_size} exceeds the {len(train_set)} training images")
    if args.num_eval is not None and args.num_eval > len(test_set):
        raise ConfigError(f"--num_eval={args.num_eval} exceeds the {len(test_set)} test images")
    unet = dict(UNET[args.dataset])
    if args.ch is not None:
        unet["ch"] = args.ch
    model = {"name": "unet", "kwargs": {"input_channels": info.channels, "input_height": info.height, **unet}}
    sde = {"beta_min": 0.1, "beta_max": 20.0, "T": args.T0}

    def batches(start, device):
        loader = train_loader(train_set, args.batch_size, seed=args.seed, start_iteration=start,
                              num_workers=args.num_workers, rank=rank, world_size=world_size,
                              pin_memory=device.type == "cuda")
        it = start
        for k, _ in loader:
            it += 1
            # Dequantisation noise and flips: a pure function of (seed, rank, iteration), so resuming is exact.
            g = torch.Generator(device=device).manual_seed(derived_seed(args.seed, TRAINING_DATA, rank, it))
            x = dequantize(k.to(device, non_blocking=True), generator=g)
            if info.hflip:
                x = random_hflip(x, generator=g)
            yield to_model_space(x, args.real)[0]

    @torch.no_grad()
    def evaluate(gen_sde, iteration):
        """Bits/dim mean and standard error over the test examples, each counted once across ranks, with the
        --elbo_estimator; noise seeded per (seed, iteration, global test batch) (lib.evaluation)."""
        device = next(gen_sde.parameters()).device
        loader = test_loader(test_set, args.test_batch_size, num_workers=args.num_workers,
                             test_subset=args.num_eval, rank=rank, world_size=world_size)
        bpd = test_set_bits_per_dim(elbo_estimator(gen_sde, args.elbo_estimator), loader,
                                    partial(to_model_space, real=args.real), info.dim, device,
                                    seed=(args.seed, EVALUATION, iteration), rank=rank, world_size=world_size)
        mean, se = mean_and_stderr(bpd)
        return {"bpd": mean, "bpd_std_err": se}

    def describe(iteration, loss, m):
        return f"Iteration {iteration}  loss {loss:.4f}  BPD {m['bpd']:.4f} ± {m['bpd_std_err']:.4f}"

    def sample(gen_sde, iteration, logger):
        device = next(gen_sde.parameters()).device
        g = torch.Generator(device=device).manual_seed(args.seed)
        y = torch.randn(args.num_samples, *info.shape, generator=g, device=device)
        x = to_image(sample_lambda(gen_sde, y, args.num_steps, args.lmbd, generator=g), args.real)
        grid = make_grid(x.cpu(), nrow=int(math.sqrt(args.num_samples)))
        logger.image("samples", grid, iteration, filename=f"samples_{iteration:07d}.png")

    return Task(kind="img", model=model, sde=sde, batches=batches, evaluate=evaluate, describe=describe,
                sample=sample, extra={"dataset": args.dataset, "real": args.real, "logit_alpha": LOGIT_ALPHA,
                                      "shape": list(info.shape)},
                channels_last=args.channels_last)

