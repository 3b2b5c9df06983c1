"""The training loop shared by train_toy.py and train_img.py: set-up, step, evaluate, log, checkpoint.

The scripts differ only in a `Task` (data, network, evaluation, samples). The loop owns
everything that must be identical for both: seeding, Adam + EMA, the divergence guard,
resuming from `checkpoint.pt`, data parallelism, and the schedule of evaluations, samples
and checkpoints.

Exact resume. Everything random in iteration n is a pure function of (seed, rank, n): the training
batch (see the tasks) and the loss's own noise (times, Y_s, dropout), drawn from torch's global RNG,
which is reseeded from (seed, rank, n) at the start of the iteration (python's and numpy's with it).
A run restarted from its checkpoint therefore draws exactly what the uninterrupted run drew, with no
RNG state to carry (each rank's own stream under DDP, on CPU and CUDA alike). The checkpoint holds
the weights, the EMA, Adam's state, the iteration and the running loss average since the last log
line. Evaluations and samples run on a forked RNG, so how often one evaluates never changes training.

Data parallelism (torchrun; lib/distributed.py). --batch_size is the global batch, split evenly
across ranks; DistributedDataParallel averages the gradients. Rank 0 alone reads the checkpoint
(and broadcasts it, so every rank resumes from the same state) and alone writes the run folder.
The loss and the finiteness checks are all-reduced, so every rank stops at the same iteration.
Evaluation and sampling use the unwrapped EMA network on every rank (an adaptive ODE solve inside
DDP hangs, DESIGN.md section 8); the image task shards its test set and gathers the results.

--amp and --compile change only how the training forward runs (see BF16Autocast); checkpoints and
evaluation always use the plain float32 network, so its state dict carries no wrapper prefixes.
"""
import contextlib
import math
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lib.checkpoint import CheckpointError, load_checkpoint, remove_partial_writes, save_checkpoint
from lib.config import ConfigError, check_writable_dir, fail, resolve_device
from lib.distributed import (Distributed, barrier, broadcast_from_main, first_error, init_distributed,
                             per_rank_values, shutdown)
from lib.ema import EMA
from lib.models import build_drift
from lib.run_logger import RunLogger
from lib.sdes import PluginReverseSDE, VariancePreservingSDE

# Arguments that may differ when a run is resumed: they change how long it runs, where its files
# are, how it computes or what it reports, never what it learns.
RESUMABLE_ARGS = {
    "num_iterations", "print_every", "sample_every", "checkpoint_every", "device", "num_workers",
    "test_batch_size", "num_eval", "lambdas", "num_steps", "lmbd", "num_samples", "saveroot", "expname",
    "dataroot", "amp", "compile", "channels_last", "elbo_estimator", "elbo_repeats",
}

# Tags that keep the random streams derived from one --seed apart.
LOSS_NOISE, EVALUATION, SAMPLES, FINISH, TRAINING_DATA = 1, 2, 3, 4, 5


class TrainingDiverged(Exception):
    """A non-finite loss, gradient or weight; the message is one line and the last checkpoint is untouched."""


@dataclass
class Task:
    """What differs between the toy and the image script.

    kind:      'toy' or 'img' (stored in the checkpoint)
    model:     {'name': ..., 'kwargs': {...}} for lib.models.build_drift
    sde:       VariancePreservingSDE keyword arguments
    batches:   batches(start_iteration, device) -> iterator of this rank's training batches (B / world_size, ...)
               for iterations start_iteration + 1, start_iteration + 2, ...
    evaluate:  evaluate(gen_sde, iteration) -> dict of scalars (EMA model, eval mode); called on every
               rank, and must return the same values on every rank
    describe:  describe(iteration, loss, metrics) -> the log line
    sample:    sample(gen_sde, iteration, logger) -> None, writes figures / grids (called on every rank;
               the logger writes on rank 0 only)
    finish:    finish(gen_sde, logger) -> None, after the last iteration (optional)
    extra:     plain-type metadata stored in the checkpoint (e.g. image shape, logit transform)
    channels_last: keep the network's weights, and so its activations, in channels_last memory format
    """

    kind: str
    model: dict
    sde: dict
    batches: object
    evaluate: object
    describe: object
    sample: object
    finish: object = None
    extra: dict = field(default_factory=dict)
    channels_last: bool = False


def run(args, make_task, user_errors=()):
    """Entry point shared by the scripts: set up (one process or torchrun's), train, and turn user errors
    into one line on stderr and exit status 1.

    make_task(args, rank, world_size) -> Task. user_errors: further exception types whose message is for
    the user. Under torchrun every such error is agreed by all ranks, and rank 0 prints it.
    """
    prog = os.path.basename(sys.argv[0])
    errors = (ConfigError, CheckpointError, TrainingDiverged, *user_errors)
    try:
        ctx = init_distributed(args.device)
    except ConfigError as err:
        fail(f"{prog}: error: {err}")
    try:
        task = _make_task(args, make_task, ctx, errors)
        logger = RunLogger(os.path.join(args.saveroot, args.expname), enabled=ctx.is_main)
        try:
            train(args, task, logger, ctx)
        finally:
            logger.close()
    except errors as err:
        if ctx.is_main:
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        # Every rank stops on these errors together (they are agreed through collectives); wait until rank 0
        # has printed, since torchrun terminates the remaining processes as soon as one exits.
        barrier(ctx)
        sys.exit(1)
    finally:
        shutdown(ctx)


def _make_task(args, make_task, ctx, errors):
    """Check the set-up and build the task on every rank; a failure on any rank stops them all.

    The first process of each machine builds first, so that a data set it downloads is complete
    before the machine's other processes read it.
    """
    def build():
        return _checked_task(args, make_task, ctx)

    if not ctx.is_distributed:
        return build()
    first = _agreed(build if ctx.local_rank == 0 else lambda: None, ctx, errors)
    others = _agreed(build if ctx.local_rank != 0 else lambda: None, ctx, errors)
    return first if ctx.local_rank == 0 else others


def _checked_task(args, make_task, ctx):
    if args.batch_size % ctx.world_size:
        raise ConfigError(f"--batch_size={args.batch_size} is the global batch and must be divisible by the "
                          f"{ctx.world_size} processes")
    if ctx.is_main:
        check_writable_dir(args.saveroot)
        run_dir = os.path.join(args.saveroot, args.expname)
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise ConfigError(f"--expname={args.expname}: {run_dir} exists and is not a folder; pick another --expname")
    return make_task(args, rank=ctx.rank, world_size=ctx.world_size)


def _agreed(build, ctx, errors):
    """build() on every rank; if it fails with a user error on any rank, every rank raises that message."""
    message, result = None, None
    try:
        result = build()
    except errors as err:
        message = str(err)
    message = first_error(ctx, message)
    if message is not None:
        raise ConfigError(message)
    return result


def learning_rate(iteration, args):
    """The learning rate of training iteration 1, 2, ...: a linear warm-up over --warmup iterations, then
    --lr held (constant) or decayed to 0 at --num_iterations along a half cosine. A pure function of the
    iteration, so a resumed run follows the same schedule."""
    if iteration <= args.warmup:
        return args.lr * iteration / args.warmup
    if args.lr_schedule == "constant":
        return args.lr
    progress = (iteration - args.warmup) / max(1, args.num_iterations - args.warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def derived_seed(*parts):
    """A seed in [0, 2^63) from non-negative integers (seed, stream tag, rank, iteration, ...).

    Distinct tuples give unrelated seeds (numpy's SeedSequence hashes them), where sums such as
    seed + iteration would make run (seed=0, iteration 5) replay run (seed=1, iteration 4).
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed):
    """Seed torch (CPU and every CUDA device), numpy's and python's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def forked_rng(seed, device):
    """Run a block on torch's global RNG seeded with `seed`, leaving the training stream as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class BF16Autocast(nn.Module):
    """net(y, s) run under bfloat16 autocast, its output returned in y's dtype (float32): --amp.

    Only the network's convolutions and matrix products run in bf16 (autocast itself keeps
    normalisations, softmax and reductions in fp32). What stays float32, and why:
      * the DSM residual a sigma / g + eps: near the optimum a sigma / g ~ -eps, so the loss is a
        small difference of O(1) numbers, which bf16's 8-bit mantissa (relative error 2^-9) would
        drown; hence the cast of the output before the loss is formed;
      * the SDE's coefficients (sigma^2 = -expm1(-B(s)) is tiny at small s) and the loss's sums over
        the D = C H W dimensions and the batch;
      * weights, gradients, Adam's moments and the EMA: an EMA step moves a weight by 1e-4 of its
        distance to the model and an Adam step at lr 1e-4 by about 1e-4, both below bf16's resolution;
      * evaluation: bits/dim comes from the unwrapped EMA network in float32, since the ELBO's
        Hutchinson divergence and D-dimensional sums decide the reported digits.
    bf16 has float32's exponent range, so no loss scaling is needed.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, y, s):
        with torch.autocast(device_type=y.device.type, dtype=torch.bfloat16):
            out = self.net(y, s)
        return out.to(y.dtype)


def training_network(drift, args, ctx):
    """The module the training forward calls: `drift` wrapped for DDP, bf16 autocast and torch.compile as
    asked. It shares drift's parameters; drift itself is what gets saved, averaged and evaluated."""
    net = BF16Autocast(drift) if args.amp else drift
    if ctx.is_distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                                  else None)
    if args.compile:
        net = torch.compile(net)  # compiling the DDP module (not the reverse) lets dynamo split at DDP's buckets
    return net


def train(args, task, logger, ctx=None):
    """Train (or resume) the run in logger.dir. Returns the EMA PluginReverseSDE in eval mode.

    ctx: this process's lib.distributed.Distributed (default: a single process on --device).
    """
    ctx = ctx or Distributed(device=resolve_device(args.device))
    device = ctx.device
    seed_everything(args.seed)  # the same initial weights on every rank
    sde = VariancePreservingSDE(**task.sde)
    drift = build_drift(task.model["name"], task.model["kwargs"]).to(device)
    if task.channels_last:
        drift.to(memory_format=torch.channels_last)  # before the EMA copy and Adam, which inherit the layout
    ema = EMA(drift, args.ema_decay)
    ema_gen_sde = PluginReverseSDE(sde, ema.shadow, args.T0, vtype=args.vtype, debias=args.debias).eval()
    optimizer = torch.optim.Adam(drift.parameters(), lr=args.lr)

    ckpt_path = logger.path("checkpoint.pt")
    start, loss_sum, loss_count = 0, 0.0, 0
    state = _read_checkpoint(ckpt_path, args, task, ctx)
    if state is not None:
        start, loss_sum, loss_count = _restore(state, drift, ema, optimizer, ckpt_path)
        logger.resume_at(start)
        note = ""
        if state.get("world_size", 1) != ctx.world_size:
            note = (f" (written by {state.get('world_size', 1)} processes, continuing with {ctx.world_size}: "
                    "same global batches, other per-process noise)")
        logger.line(f"Resuming from {ckpt_path} at iteration {start}{note}")
    if ctx.is_main:
        remove_partial_writes(logger.dir)
    logger.save_args(args)
    last_saved = start if state is not None else None

    def checkpoint(iteration, running):
        nonlocal last_saved
        _check_finite_weights(iteration, (drift, ema.shadow), args, ckpt_path, last_saved)
        if ctx.is_main:
            save_checkpoint(ckpt_path, {
                "kind": task.kind, "args": vars(args), "model": task.model, "sde": task.sde,
                "gen_sde": {"T": args.T0, "vtype": args.vtype, "debias": args.debias}, "extra": task.extra,
                "iteration": iteration, "model_state": drift.state_dict(), "ema_state": ema.shadow.state_dict(),
                "optimizer_state": optimizer.state_dict(), "running_loss": list(running),
                "world_size": ctx.world_size,
            })
        last_saved = iteration

    def evaluate(iteration, loss):
        with forked_rng(derived_seed(args.seed, EVALUATION, iteration), device):
            metrics = task.evaluate(ema_gen_sde, iteration)
        logger.metrics(iteration, {"loss": loss, **metrics})
        logger.line(task.describe(iteration, loss, metrics))
        return metrics

    def sample(iteration):
        with forked_rng(derived_seed(args.seed, SAMPLES, iteration), device):
            task.sample(ema_gen_sde, iteration, logger)

    if start >= args.num_iterations:
        hint = ("a cosine schedule has ended: train longer under another --expname" if args.lr_schedule == "cosine"
                else "raise --num_iterations to continue")
        logger.line(f"Run already complete at iteration {start} ({hint})")
        return ema_gen_sde

    gen_sde = PluginReverseSDE(sde, training_network(drift, args, ctx), args.T0, vtype=args.vtype,
                               debias=args.debias).train()
    batches = task.batches(start, device)
    last = {}
    # A progress bar on rank 0 in a terminal only: in a redirected log it is noise.
    bar = tqdm(range(start + 1, args.num_iterations + 1), initial=start, total=args.num_iterations,
               disable=None if logger.enabled else True, dynamic_ncols=True)
    try:
        for it in bar:
            seed_iteration(args.seed, ctx.rank, it)
            x = next(batches)
            loss = gen_sde.dsm(x).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = _check_finite_step(it, loss, drift, args, ckpt_path, last_saved, ctx)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(it, args)
            optimizer.step()
            ema.update(drift, it)

            loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
            if it == 1 or it % args.print_every == 0 or it == args.num_iterations:
                last = evaluate(it, loss_sum / loss_count)
                loss_sum, loss_count = 0.0, 0
            if it % args.sample_every == 0 or it == args.num_iterations:
                sample(it)
            if it % args.checkpoint_every == 0 or it == args.num_iterations:
                checkpoint(it, (loss_sum, loss_count))
            bar.set_postfix(loss=f"{loss_value:.4g}", **{k: f"{v:.4g}" for k, v in list(last.items())[:1]})
    finally:
        bar.close()  # before any error line, so that line does not land on the bar's
    if task.finish is not None:
        with forked_rng(derived_seed(args.seed, FINISH), device):
            task.finish(ema_gen_sde, logger)
    return ema_gen_sde


def seed_iteration(seed, rank, iteration):
    """Make the global RNGs a pure function of (seed, rank, iteration): the loss noise of one step."""
    seed_everything(derived_seed(seed, LOSS_NOISE, rank, iteration))


def _check_finite_step(it, loss, drift, args, ckpt_path, last_saved, ctx):
    """Stop before the update when the loss (on any rank) or the gradient is not finite, so no NaN weight
    is ever saved. The values are all-reduced, so every rank decides alike and none is left waiting in a
    collective. Returns the loss averaged over ranks (the loss of the global batch) as a float."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in drift.parameters() if p.grad is not None])
    table = per_rank_values(ctx, torch.stack([loss.detach().float(), grad_norm.float()])).tolist()  # (W, 2)
    if all(math.isfinite(v) for row in table for v in row):
        return sum(row[0] for row in table) / len(table)
    losses = [(rank, row[0]) for rank, row in enumerate(table) if not math.isfinite(row[0])]
    if losses:
        rank, value = losses[0]
        what = f"the loss is {value}" + (f" on rank {rank}" if ctx.is_distributed else "")
    else:
        what = f"the gradient norm is {table[0][1]}"
    raise TrainingDiverged(f"training diverged at iteration {it}: {what}; stopped before the update, "
                           f"{_kept(ckpt_path, last_saved)}; try a lower --lr (now {args.lr:g})")


def _check_finite_weights(it, modules, args, ckpt_path, last_saved):
    """Refuse to checkpoint non-finite weights (an update can overflow even when its gradient was finite)."""
    finite = torch.stack([torch.isfinite(p).all() for m in modules for p in m.parameters()]).all()
    if not finite.item():
        raise TrainingDiverged(f"training diverged at iteration {it}: the update made the weights non-finite; "
                               f"{_kept(ckpt_path, last_saved)}; try a lower --lr (now {args.lr:g})")


def _kept(ckpt_path, last_saved):
    if last_saved is None:
        return "no checkpoint was written"
    return f"the last checkpoint {ckpt_path} (iteration {last_saved}) is kept"


def _read_checkpoint(path, args, task, ctx):
    """The run's checkpoint (None for a fresh run), read by rank 0 and handed to every rank."""
    state, message = None, None
    if ctx.is_main and os.path.exists(path):
        try:
            state = load_checkpoint(path, map_location="cpu")
            _check_same_run(state, args, task, path)
        except CheckpointError as err:
            state, message = None, str(err)
    state, message = broadcast_from_main(ctx, (state, message))
    if message is not None:
        raise CheckpointError(message)
    return state


def _restore(state, drift, ema, optimizer, path):
    """Load the training state (strictly); returns (iteration, running loss sum, running loss count)."""
    try:
        drift.load_state_dict(state["model_state"])
        ema.shadow.load_state_dict(state["ema_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        loss_sum, loss_count = state.get("running_loss", (0.0, 0))  # absent from checkpoints before it was kept
        return int(state["iteration"]), float(loss_sum), int(loss_count)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} does not fit this run ({type(err).__name__}: {reason}); "
                              "delete it to start afresh or pick another --expname") from None


def _check_same_run(state, args, task, path):
    """A checkpoint may only resume the run that wrote it: same task and same learning-relevant arguments."""
    if state.get("kind") != task.kind:
        raise CheckpointError(f"{path} was written by a {state.get('kind')} run, not {task.kind}; "
                              "delete it or pick another --expname")
    saved, now = state.get("args"), vars(args)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} holds no run arguments; delete it or pick another --expname")
    resumable = RESUMABLE_ARGS
    if now.get("lr_schedule") == "cosine":  # the cosine's horizon is --num_iterations: it is part of the schedule
        resumable = RESUMABLE_ARGS - {"num_iterations"}
    for key in sorted(set(saved) | set(now)):
        if key in resumable or saved.get(key) == now.get(key):
            continue
        raise CheckpointError(
            f"{path} was written with --{key}={saved.get(key)}, this command has --{key}={now.get(key)}; "
            "use the same arguments to resume, or pick another --expname"
        )
