"""The training loop shared by train_toy.py and train_img.py: set-up, step, evaluate, log, checkpoint.

The scripts differ only in a task (lib/task.py: data, network, evaluation, samples). The loop owns
everything that must be identical for both: seeding, Adam + EMA, the divergence guard,
resuming from `checkpoint.pt`, data parallelism, and the schedule of evaluations, samples
and checkpoints.

Exact resume. Everything random in iteration n is a pure function of (seed, stream, rank, n) (lib/rng.py):
the training batch (see the tasks) and the loss's own noise (times, Y_s, dropout), drawn from torch's
global RNG, which is reseeded from (seed, LOSS_NOISE, rank, n) at the start of the iteration.
A run restarted from its checkpoint therefore draws exactly what the uninterrupted run drew, with no
RNG state to carry (each rank's own stream under DDP, on CPU and CUDA alike). The checkpoint holds
the weights, the EMA, Adam's state, the iteration and the running loss average since the last log
line. Evaluations and samples run on a forked RNG, so how often one evaluates never changes training.

Data parallelism (torchrun; lib/distributed.py). --batch_size is the global batch, split evenly
across ranks; DistributedDataParallel averages the gradients. Rank 0 alone reads the checkpoint
(and broadcasts it, so every rank resumes from the same state) and alone writes the run folder.
The loss and the finiteness checks are all-reduced, so every rank stops at the same iteration.
Evaluation and sampling use the unwrapped EMA network on every rank (an adaptive ODE solve inside
DDP hangs, docs/math.md section 8); the image task shards its test set and gathers the results.

--amp and --compile change only how the training forward runs (see BF16Autocast); checkpoints and
evaluation always use the plain float32 network, so its state dict carries no wrapper prefixes.
"""
import math
import os
import sys

import torch
from torch import nn
from tqdm import tqdm

from lib.checkpoint import (CheckpointError, read_for_resume, remove_partial_writes, restore_training_state,
                            save_checkpoint)
from lib.config import ConfigError, check_writable_dir, fail, resolve_device
from lib.distributed import Distributed, barrier, first_error, init_distributed, per_rank_values, shutdown
from lib.ema import EMA
from lib.models import build_drift
from lib.rng import Stream, forked_rng, seed_everything, seed_global
from lib.run_logger import RunLogger
from lib.sdes import PluginReverseSDE, VariancePreservingSDE

class TrainingDiverged(Exception):
    """A non-finite loss, gradient or weight; the message is one line and the last checkpoint is untouched."""


def run(args, make_task, user_errors=()):
    """Entry point shared by the scripts: set up (one process or torchrun's), train, and turn user errors
    into one line on stderr and exit status 1.

    make_task(args, rank, world_size) -> a lib.task.Task (e.g. the task's class). user_errors: further
    exception types whose message is for the user. Under torchrun every such error is agreed by all ranks, and rank 0 prints it.
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
    task = make_task(args, rank=ctx.rank, world_size=ctx.world_size)
    task.prepare()
    return task


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
    state = read_for_resume(ckpt_path, args, task, ctx)
    if state is not None:
        start, loss_sum, loss_count = restore_training_state(state, drift, ema, optimizer, ckpt_path)
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
        with forked_rng(args.seed, Stream.EVALUATION, iteration, device=device):
            metrics = task.evaluate(ema_gen_sde, iteration)
        logger.metrics(iteration, {"loss": loss, **metrics})
        logger.line(task.describe(iteration, loss, metrics))
        return metrics

    def sample(iteration):
        with forked_rng(args.seed, Stream.SAMPLES, iteration, device=device):
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
            seed_global(args.seed, Stream.LOSS_NOISE, ctx.rank, it)
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
    with forked_rng(args.seed, Stream.FINISH, device=device):
        task.finish(ema_gen_sde, logger)
    return ema_gen_sde


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
