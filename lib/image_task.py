"""The image task (MNIST, CIFAR-10): 8-bit data through lib/pixels.py, the DDPM U-Net, bits/dim, sample grids.

    bpd = -(ELBO(z) + log|dz/dx|) / (D ln 2) + 8,   z = logit(alpha + (1 - 2 alpha) x),  x = (k + u) / 256

with the ELBO from PluginReverseSDE.elbo (default) or sdeflow-light's elbo_random_t_slice
(--elbo_estimator=random_t_slice): both unbiased, the first with far less variance (benchmarks/elbo_variance.py).
"""
import functools
import math

import torch
from torchvision.utils import make_grid, save_image

from lib.config import ConfigError
from lib.evaluation import elbo_estimator, summarize, test_set_bits_per_dim
from lib.image_data import INFO, load_image_datasets, random_hflip, test_loader, train_loader
from lib.pixels import LOGIT_ALPHA, dequantize, to_image, to_model_space
from lib.rng import Stream, generator
from lib.samplers import sample_lambda
from lib.task import Task, device_of

# U-Net per data set (Ho et al. 2020 for CIFAR-10; a smaller one for MNIST).
UNET = {
    "mnist": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0),
    "cifar": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
}


class ImageTask(Task):
    kind = "img"
    resumable_args = frozenset({"test_batch_size", "num_eval", "lmbd", "num_samples", "dataroot", "num_workers",
                                "channels_last", "elbo_estimator"})

    @classmethod
    def from_stored_args(cls, args):
        return cls(args)

    @property
    def info(self):
        return INFO[self.args.dataset]

    @property
    def model(self):
        unet = dict(UNET[self.args.dataset])
        if getattr(self.args, "ch", None) is not None:
            unet["ch"] = self.args.ch
        return {"name": "unet", "kwargs": {"input_channels": self.info.channels, "input_height": self.info.height,
                                           **unet}}

    @property
    def sde(self):
        return {"beta_min": 0.1, "beta_max": 20.0, "T": self.args.T0}

    @property
    def extra(self):
        return {"dataset": self.args.dataset, "real": self.args.real, "logit_alpha": LOGIT_ALPHA,
                "shape": list(self.info.shape)}

    @property
    def sample_shape(self):
        return self.info.shape

    @property
    def channels_last(self):
        return bool(getattr(self.args, "channels_last", False))

    @functools.lru_cache(maxsize=2)
    def datasets(self, dataroot=None):
        """(train set, test set) under `dataroot` (default: the run's --dataroot); DatasetNotFoundError if absent."""
        train_set, test_set, _ = load_image_datasets(self.args.dataset, dataroot or self.args.dataroot)
        return train_set, test_set

    def to_image(self, z):
        """Model space -> images in [0, 1], for viewing."""
        return to_image(z, self.args.real)

    # --- training ----------------------------------------------------------------------------------

    def prepare(self):
        train_set, test_set = self.datasets()
        if self.args.batch_size > len(train_set):
            raise ConfigError(f"--batch_size={self.args.batch_size} exceeds the {len(train_set)} training images")
        if self.args.num_eval is not None and self.args.num_eval > len(test_set):
            raise ConfigError(f"--num_eval={self.args.num_eval} exceeds the {len(test_set)} test images")

    def batches(self, start, device):
        a = self.args
        loader = train_loader(self.datasets()[0], a.batch_size, seed=a.seed, start_iteration=start,
                              num_workers=a.num_workers, rank=self.rank, world_size=self.world_size,
                              pin_memory=device.type == "cuda")
        it = start
        for k, _ in loader:
            it += 1
            g = generator(a.seed, Stream.TRAINING_DATA, self.rank, it, device=device)
            x = dequantize(k.to(device, non_blocking=True), generator=g)
            if self.info.hflip:
                x = random_hflip(x, generator=g)
            yield to_model_space(x, a.real)[0]

    @torch.no_grad()
    def evaluate(self, gen_sde, iteration):
        """Bits/dim mean and standard error over the test examples, each counted once across ranks, with the
        --elbo_estimator; noise seeded per (seed, EVALUATION, iteration, global test batch)."""
        a = self.args
        bpd = self._test_bits_per_dim(elbo_estimator(gen_sde, a.elbo_estimator), device_of(gen_sde),
                                      (a.seed, Stream.EVALUATION, iteration), a.num_eval, a.test_batch_size,
                                      shard=True)
        return summarize("bpd", bpd)

    def describe(self, iteration, loss, m):
        return f"Iteration {iteration}  loss {loss:.4f}  BPD {m['bpd']:.4f} ± {m['bpd_std_err']:.4f}"

    def sample(self, gen_sde, iteration, logger):
        a = self.args
        device = device_of(gen_sde)
        g = generator(a.seed, Stream.SAMPLES, iteration, device=device)
        y = torch.randn(a.num_samples, *self.sample_shape, generator=g, device=device)
        x = self.to_image(sample_lambda(gen_sde, y, a.num_steps, a.lmbd, generator=g))
        grid = make_grid(x.cpu(), nrow=int(math.sqrt(a.num_samples)))
        logger.image("samples", grid, iteration, filename=f"samples_{iteration:07d}.png")

    # --- tools -------------------------------------------------------------------------------------

    def likelihood_report(self, estimate, name, device, seed, num_eval=None, batch_size=None, dataroot=None):
        """Bits/dim over the first `num_eval` test images (default all) under `dataroot` (default the run's), in
        batches of `batch_size` (default the run's --test_batch_size)."""
        # evaluate.py's batches draw from (seed, batch, part): the layout it had before the streams were named,
        # kept so that its figures for a given --seed stay what they were.
        bpd = self._test_bits_per_dim(estimate, device, (seed,), num_eval, batch_size or self.args.test_batch_size,
                                      dataroot=dataroot)
        return {"unit": "bits/dim", "dataset": self.args.dataset, "num_images": bpd.numel(), **summarize("bpd", bpd)}

    def default_elbo_repeats(self):
        return 1

    def default_divergence(self):
        return "rademacher"  # the exact divergence costs one backward pass per pixel

    def save_samples(self, x, path, title, seed):
        save_image(self.to_image(x).cpu(), path, nrow=math.ceil(math.sqrt(x.shape[0])))
        return {}

    # --- helpers -----------------------------------------------------------------------------------

    def _test_bits_per_dim(self, estimate, device, seed, num_eval, batch_size, shard=False, dataroot=None):
        test_set = self.datasets(dataroot)[1]
        if num_eval is not None and num_eval > len(test_set):
            raise ConfigError(f"--num_eval={num_eval} exceeds the {len(test_set)} test images in "
                              f"{dataroot or self.args.dataroot}")
        rank, world_size = (self.rank, self.world_size) if shard else (0, 1)
        loader = test_loader(test_set, batch_size, num_workers=getattr(self.args, "num_workers", 0) if shard else 0,
                             test_subset=num_eval, rank=rank, world_size=world_size)
        return test_set_bits_per_dim(estimate, loader, self.args.real, device, seed=seed, rank=rank,
                                     world_size=world_size)
