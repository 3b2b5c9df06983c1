"""Command-line configuration shared by the training scripts: typed, validated once, one-line errors.

Each value is checked where it is parsed (argparse `type=`), so a bad flag is refused before any
work starts, with one line naming the flag, the value and what is allowed.
"""
import argparse
import math
import os
import sys

import torch

from lib.hutchinson import VTYPES
from lib.sdes import SDES


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors on one line (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows each flag's default (a None default is explained in the
    flag's own help, since it means "decided by the run")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class ConfigError(Exception):
    """A configuration problem found after parsing (e.g. an unwritable --saveroot); its text is one line."""


def str2bool(value):
    """Booleans are written exactly `True` or `False` (as in `--debias=True`)."""
    if value in ("True", "False"):
        return value == "True"
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def positive_int(value):
    n = _parse(int, value, "an integer")
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def nonnegative_int(value):
    n = _parse(int, value, "an integer")
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return n


def seed_value(value):
    """A seed in [0, 2^32): numpy's SeedSequence splits larger integers into 32-bit words, so a seed of 2^32 + 1
    would share its draws with another run's (lib/rng.py)."""
    n = _parse(int, value, "an integer")
    if not 0 <= n < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^32), got {value}")
    return n


def positive_float(value):
    """A number > 0 that float32 can hold (learning rates, noise levels and times all meet float32 tensors)."""
    x = _parse(float, value, "a number")
    if not (x > 0 and math.isfinite(x) and x <= torch.finfo(torch.float32).max):
        raise argparse.ArgumentTypeError(f"must be a number > 0 and at most 3.4e38 (float32's largest), got {value}")
    return x


def multiple_of(k):
    """A positive integer multiple of k (e.g. U-Net channels, which GroupNorm splits into 32 groups)."""

    def parse(value):
        n = _parse(int, value, "an integer")
        if n <= 0 or n % k:
            raise argparse.ArgumentTypeError(f"must be a positive multiple of {k}, got {value}")
        return n

    parse.__name__ = f"multiple_of_{k}"
    return parse


def nonnegative_float(value):
    x = _parse(float, value, "a number")
    if not (x >= 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return x


def dropout_rate(value):
    """A probability in [0, 1) (1 would drop everything)."""
    x = _parse(float, value, "a number")
    if not 0.0 <= x < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return x


def unit_interval(value):
    """A float in [0, 1] (a sampling lambda, an EMA decay)."""
    x = _parse(float, value, "a number")
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return x


def lambda_list(value):
    """Comma-separated lambdas in [0, 1], e.g. `0,0.25,0.5,0.75,1`."""
    parts = [p.strip() for p in str(value).split(",")]
    if not parts or any(p == "" for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {value!r}")
    try:
        return [unit_interval(p) for p in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"each lambda must be a number in [0, 1] (0: reverse SDE, 1: probability-flow ODE), got {value!r}"
        ) from None


def device_name(value):
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."""
    if value == "auto" or value == "cpu" or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} asked for CUDA, but no CUDA device is available; use --device=cpu or auto")
    return device


def add_training_args(parser, defaults):
    """The flags every training script shares; `defaults` maps flag names to script-specific defaults."""
    d = defaults
    parser.add_argument("--saveroot", default=d.get("saveroot", "runs"), help="folder holding the run folders")
    parser.add_argument("--expname", default=d["expname"], help="run folder name under --saveroot; rerun to resume")
    parser.add_argument("--seed", type=seed_value, default=0, help="every random draw derives from it (lib/rng.py)")
    parser.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    parser.add_argument("--num_iterations", type=positive_int, default=d["num_iterations"])
    parser.add_argument("--batch_size", type=positive_int, default=d["batch_size"],
                        help="the global batch: under torchrun each of the N processes takes batch_size / N")
    parser.add_argument("--lr", type=positive_float, default=d["lr"], help="Adam learning rate")
    parser.add_argument("--lr_schedule", choices=("constant", "cosine"), default=d.get("lr_schedule", "constant"),
                        help="constant, or cosine decay to 0 at --num_iterations (after the warm-up)")
    parser.add_argument("--warmup", type=nonnegative_int, default=d.get("warmup", 0),
                        help="iterations of linear learning-rate warm-up from 0")
    parser.add_argument("--ema_decay", type=unit_interval, default=d.get("ema_decay", 0.999),
                        help="EMA of the weights used for evaluation and sampling (0 disables)")
    parser.add_argument("--debias", type=str2bool, default=d["debias"],
                        help="True: draw s from the likelihood-weighting q(s); False: s ~ U[0, T]")
    parser.add_argument("--vtype", choices=VTYPES, default="rademacher", help="Hutchinson probe of the ELBO")
    parser.add_argument("--sde", choices=tuple(SDES), default="vp",
                        help="the forward SDE: vp (variance preserving) or subvp (Song et al. 2021's sub-VP)")
    parser.add_argument("--grad_clip", type=nonnegative_float, default=d.get("grad_clip", 0.0),
                        help="clip the gradient's global norm to this value before each step (0: no clipping)")
    parser.add_argument("--T0", type=positive_float, default=1.0, help="integration horizon T of the SDE")
    parser.add_argument("--print_every", type=positive_int, default=d["print_every"], help="evaluate and log")
    parser.add_argument("--sample_every", type=positive_int, default=d["sample_every"])
    parser.add_argument("--checkpoint_every", type=positive_int, default=d["checkpoint_every"])
    parser.add_argument("--num_steps", type=positive_int, default=d["num_steps"], help="sampler steps")
    parser.add_argument("--amp", type=str2bool, default=False,
                        help="True: run the training forward of the network in bfloat16 autocast (GPUs)")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="True: torch.compile the network for training (GPUs; the first steps compile)")
    return parser


def check_writable_dir(path, flag="--saveroot"):
    """Create `path` if needed and prove it is writable, or raise ConfigError naming the flag."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"{flag}={path} cannot be written ({err.strerror}); pick a folder you can write to") from None


def fail(message, status=1):
    """Print one line to stderr and exit: the scripts' way of refusing bad input without a traceback."""
    print(message, file=sys.stderr)
    sys.exit(status)


def _parse(kind, value, what):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
