"""Train the plug-in reverse SDE on MNIST or CIFAR-10 with the DDPM U-Net and report bits/dim.

    python train_img.py --dataset=cifar --debias=True
    python train_img.py --dataset=mnist --dataroot=data --num_eval=1000

A drop-in for sdeflow-light's command line (booleans are written --real=True / --debias=False).
Data are read by torchvision's MNIST / CIFAR10 classes from --dataroot (CIFAR-10 under
<dataroot>/cifar10) and downloaded when the network allows. The run folder <saveroot>/<expname>
holds args.json, log.txt (one line per evaluation: iteration, loss, BPD ± standard error),
metrics.jsonl, TensorBoard events (loss, bpd, bpd_std_err, samples), sample grids and
checkpoint.pt; rerunning the same command resumes from the checkpoint.
Exit status: 0 done, 1 error (one line on stderr), 75 stopped by SIGTERM/SIGUSR1 after checkpointing (rerun to resume).

Several GPUs, on one machine or several, train data-parallel under torchrun (rank 0 writes the run
folder; --batch_size stays the global batch, split across the processes):

    torchrun --standalone --nproc_per_node=8 train_img.py --dataset=cifar --amp=True --compile=True
"""
from lib.config import (ArgumentParser, add_training_args, dropout_rate, multiple_of, nonnegative_int, positive_int,
                        str2bool, unit_interval)
from lib.evaluation import ELBO_ESTIMATORS
from lib.training import run

DEFAULTS = dict(expname="img", num_iterations=100_000, batch_size=64, lr=5e-4, ema_decay=0.9999, debias=False,
                print_every=500, sample_every=5_000, checkpoint_every=1_000, num_steps=1_000)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("mnist", "cifar"), default="mnist")
    p.add_argument("--dataroot", default="data", help="MNIST under <dataroot>/MNIST, CIFAR-10 under <dataroot>/cifar10")
    add_training_args(p, DEFAULTS)
    p.add_argument("--test_batch_size", type=positive_int, default=256)
    p.add_argument("--num_eval", type=positive_int, default=None,
                   help="evaluate bits/dim on the first N test images only (default: the whole test set)")
    p.add_argument("--elbo_estimator", choices=tuple(ELBO_ESTIMATORS), default="elbo",
                   help="bits/dim from PluginReverseSDE.elbo (low variance) or sdeflow-light's random_t_slice")
    p.add_argument("--elbo_times", type=positive_int, default=8,
                   help="stratified times per test image of the in-run .elbo (evaluate.py uses 32 by default); "
                        "4 or more also report the estimator's own share of the standard error")
    p.add_argument("--real", type=str2bool, default=True, help="True: model logit(alpha + (1 - 2 alpha) x)")
    p.add_argument("--lmbd", type=unit_interval, default=0.0, help="λ of the sampler for the sample grids")
    p.add_argument("--num_samples", type=positive_int, default=64, help="images per sample grid")
    p.add_argument("--num_workers", type=nonnegative_int, default=2, help="data-loading processes")
    p.add_argument("--channels_last", type=str2bool, default=False,
                   help="True: keep the U-Net in channels_last memory format, which oneDNN's CPU convolutions run "
                        "without reordering (a CIFAR-10 batch-64 step 1.3x faster on a 2-core CPU)")
    p.add_argument("--ch", type=multiple_of(32), default=None,
                   help="U-Net base channels (default: 32 for MNIST, 128 for CIFAR-10; a multiple of 32)")
    p.add_argument("--precond", type=str2bool, default=True,
                   help="True: the U-Net is preconditioned by the training set's statistics (lib/models/precond.py); "
                        "False: it outputs the raw drift, as sdeflow-light's does")
    p.add_argument("--dropout", type=dropout_rate, default=None,
                   help="U-Net dropout (default: 0 for MNIST, 0.1 for CIFAR-10)")
    return p.parse_args(argv)


def main(argv=None):
    from lib.image_data import DatasetNotFoundError
    from lib.image_task import ImageTask

    run(parse_args(argv), ImageTask, user_errors=(DatasetNotFoundError,))


if __name__ == "__main__":
    main()
