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
from lib.evaluation import elbo_estimator, stratified_elbo, summary_with_noise, test_set_bits_per_dim
from lib.image_data import INFO, load_image_datasets, pixel_counts, random_hflip, test_loader, train_loader
from lib.pixels import LOGIT_ALPHA, dequantize, model_space_statistics, to_image, to_model_space
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
                                "channels_last", "elbo_estimator", "elbo_times"})
    legacy_args = {**Task.legacy_args, "precond": False, "dropout": None, "elbo_times": 1}

    @classmethod
    def from_stored_args(cls, args):
        return cls(args)

    @property
    def info(self):
        return INFO[self.args.dataset]

    @property
    def model(self):
        """The DDPM U-Net of the data set (--ch, --dropout override its width and dropout): preconditioned by the
        training set's statistics in model space (--precond=True, lib/models/precond.py), or the raw drift."""
        unet = {"input_channels": self.info.channels, "input_height": self.info.height, **UNET[self.args.dataset]}
        if getattr(self.args, "ch", None) is not None:
            unet["ch"] = self.args.ch
        if self.args.dropout is not None:
            unet["dropout"] = self.args.dropout
        if not self.args.precond:
            return {"name": "unet", "kwargs": unet}
        mean, std, scale = self.data_statistics
        sde = {k: v for k, v in self.sde.items() if k != "T"}  # the horizon is not part of alpha, sigma and g
        return {"name": "precond_unet", "kwargs": {"unet": unet, "sde": sde, "data_mean": mean, "data_std": std,
                                                   "data_scale": scale}}

    @functools.cached_property
    def data_statistics(self):
        """(mean, std, finest scale) of the dequantized training images in model space (lib.pixels)."""
        return model_space_statistics(pixel_counts(self.datasets()[0]), self.args.real)

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
        --elbo_estimator (.elbo with --elbo_times stratified times per image); noise seeded per
        (seed, EVALUATION, iteration, global test batch)."""
        a = self.args
        with_noise = a.elbo_estimator == "elbo" and a.elbo_times >= 4
        estimate = (stratified_elbo(gen_sde, a.elbo_times) if with_noise
                    else elbo_estimator(gen_sde, a.elbo_estimator, num_times=a.elbo_times))  # the slice ignores it
        out = self._test_bits_per_dim(estimate, device_of(gen_sde), (a.seed, Stream.EVALUATION, iteration),
                                      a.num_eval, a.test_batch_size, shard=True, with_noise=with_noise)
        return summary_with_noise("bpd", *(out if with_noise else (out, None)))

    def describe(self, iteration, loss, m):
        noise = f" (estimator {m['bpd_estimator_std_err']:.4f})" if "bpd_estimator_std_err" in m else ""
        how = (f"elbo, {self.args.elbo_times} times/image" if self.args.elbo_estimator == "elbo"
               else self.args.elbo_estimator)
        return f"Iteration {iteration}  loss {loss:.4f}  BPD {m['bpd']:.4f} ± {m['bpd_std_err']:.4f}{noise}  [{how}]"

    def sample(self, gen_sde, iteration, logger):
        a = self.args
        device = device_of(gen_sde)
        g = generator(a.seed, Stream.SAMPLES, iteration, device=device)
        y = torch.randn(a.num_samples, *self.sample_shape, generator=g, device=device)
        x = self.to_image(sample_lambda(gen_sde, y, a.num_steps, a.lmbd, generator=g))
        grid = make_grid(x.cpu(), nrow=int(math.sqrt(a.num_samples)))
        logger.image("samples", grid, iteration, filename=f"samples_{iteration:07d}.png")

    # --- tools -------------------------------------------------------------------------------------

    def likelihood_report(self, estimate, name, device, seed, num_eval=None, batch_size=None, dataroot=None,
                          with_noise=False):
        """Bits/dim over the first `num_eval` test images (default all) under `dataroot` (default the run's), in
        batches of `batch_size` (default the run's --test_batch_size), and each image's."""
        # evaluate.py's batches draw from (seed, batch, part): the layout it had before the streams were named,
        # kept so that its figures for a given --seed stay what they were.
        out = self._test_bits_per_dim(estimate, device, (seed,), num_eval, batch_size or self.args.test_batch_size,
                                      dataroot=dataroot, with_noise=with_noise)
        bpd, noise = out if with_noise else (out, None)
        return {"unit": "bits/dim", "dataset": self.args.dataset, "num_images": bpd.numel(),
                **summary_with_noise("bpd", bpd, noise), "bpd_per_image": bpd.tolist()}

    def default_elbo_repeats(self):
        return 1

    def default_divergence(self):
        return "rademacher"  # the exact divergence costs one backward pass per pixel

    def save_samples(self, x, path, title, seed):
        save_image(self.to_image(x).cpu(), path, nrow=math.ceil(math.sqrt(x.shape[0])))
        return {}

    # --- helpers -----------------------------------------------------------------------------------

    def _test_bits_per_dim(self, estimate, device, seed, num_eval, batch_size, shard=False, dataroot=None,
                           with_noise=False):
        test_set = self.datasets(dataroot)[1]
        if num_eval is not None and num_eval > len(test_set):
            raise ConfigError(f"--num_eval={num_eval} exceeds the {len(test_set)} test images in "
                              f"{dataroot or self.args.dataroot}")
        rank, world_size = (self.rank, self.world_size) if shard else (0, 1)
        loader = test_loader(test_set, batch_size, num_workers=getattr(self.args, "num_workers", 0) if shard else 0,
                             test_subset=num_eval, rank=rank, world_size=world_size)
        return test_set_bits_per_dim(estimate, loader, self.args.real, device, seed=seed, rank=rank,
                                     world_size=world_size, with_noise=with_noise)
