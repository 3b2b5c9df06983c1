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

Pre-emption. SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before they kill a job) only sets a flag
(StopSignals), so no signal, a second one included, interrupts a step or a checkpoint write. The iteration
in progress is finished (with its due evaluation and samples), a checkpoint is written, one line says
where, and the process exits with status PREEMPTED (75). Under torchrun the flag travels in the per-
iteration all-reduce of the finiteness checks, so a signal to any rank stops every rank at the same
iteration (the one in progress, or the next if it came after that all-reduce) at no extra collective.

Failed writes. A checkpoint, log, metrics or TensorBoard write that fails (disk full, I/O error, permission
lost) stops the run with one line naming the file and the cause (exit status 1); the previous checkpoint
is untouched, so rerunning the command once the disk is fixed resumes. Under torchrun rank 0's failure is
agreed by every rank after each iteration that wrote. Figures only warn (lib/run_logger.py).
"""
import contextlib
import math
import os
import signal
import sys
import threading

import torch
from torch import nn
from tqdm import tqdm

from lib.checkpoint import (CheckpointError, read_for_resume, remove_partial_writes, restore_training_state,
                            save_checkpoint)
from lib.config import ConfigError, check_writable_dir, fail, resolve_device
from lib.distributed import Distributed, barrier, first_error, init_distributed, per_rank_values, shutdown
from lib.ema import EMA
from lib.files import WriteError, cannot_write
from lib.models import build_drift
from lib.ode import ODESolveError
from lib.rng import Stream, forked_rng, seed_everything, seed_global
from lib.run_logger import RunLogger
from lib.sdes import PluginReverseSDE, build_sde

# Exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint: sysexits.h's EX_TEMPFAIL ("try
# again later"), apart from 1 (an error to fix) and from 128 + n (killed by signal n, nothing saved).
PREEMPTED = 75


class TrainingDiverged(Exception):
    """A non-finite loss, gradient or weight; the message is one line and the last checkpoint is untouched."""


class Preempted(Exception):
    """Training stopped on SIGTERM / SIGUSR1 with its checkpoint written; the line was logged already."""


class StopSignals:
    """While active (a context manager), SIGTERM and SIGUSR1 are recorded instead of acted on: the handler only
    notes the first signal's number, so nothing in progress is interrupted. Python runs handlers in the main
    thread only, so elsewhere (a run started from another thread) nothing is installed and nothing is recorded.
    The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.number = 0  # the first signal received, 0 if none
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum, frame):
        self.number = self.number or signum


def run(args, make_task, user_errors=()):
    """Entry point shared by the scripts: set up (one process or torchrun's), train, and turn user errors
    into one line on stderr and exit status 1.

    make_task(args, rank, world_size) -> a lib.task.Task (e.g. the task's class). user_errors: further
    exception types whose message is for the user. Under torchrun every such error is agreed by all ranks,
    and rank 0 prints it.
    """
    prog = os.path.basename(sys.argv[0])
    errors = (ConfigError, CheckpointError, TrainingDiverged, WriteError, ODESolveError, *user_errors)
    with StopSignals() as signals:  # from the start: a signal during set-up stops the run after its first iteration
        try:
            ctx = init_distributed(args.device)
        except ConfigError as err:
            fail(f"{prog}: error: {err}")
        try:
            task = _make_task(args, make_task, ctx, errors)
            logger = RunLogger(os.path.join(args.saveroot, args.expname), enabled=ctx.is_main)
            try:
                train(args, task, logger, ctx, signals)
            except BaseException:
                logger.close(quietly=True)  # the error on its way out is the one to report
                raise
            logger.close()
        except Preempted:
            barrier(ctx)  # every rank stops at the same iteration; rank 0 has written the checkpoint
            sys.exit(PREEMPTED)
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
    fresh = not os.path.exists(os.path.join(args.saveroot, args.expname, "checkpoint.pt"))
    if fresh and args.warmup > args.num_iterations:  # a run already written keeps the schedule it has
        raise ConfigError(f"--warmup={args.warmup} outlasts the run (--num_iterations={args.num_iterations}): the "
                          "learning rate would never reach --lr; pass a shorter --warmup (0: none)")
    task = make_task(args, rank=ctx.rank, world_size=ctx.world_size)
    t_epsilon = build_sde(task.sde).t_epsilon
    if args.T0 <= t_epsilon:  # the debiasing density and the ELBO's switch of form live on (t_epsilon, T]
        raise ConfigError(f"--T0={args.T0:g} must exceed the SDE's t_epsilon = {t_epsilon:g}, below which the "
                          "ELBO and the debiased time density are undefined; use a larger --T0 (default 1)")
    if ctx.is_main:
        check_writable_dir(args.saveroot)
        run_dir = os.path.join(args.saveroot, args.expname)
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise ConfigError(f"--expname={args.expname}: {run_dir} exists and is not a folder; pick another --expname")
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
    normalisations, softmax and reductions in fp32). What the cast of the output back to float32 does:
      * it does not restore precision lost inside the forward: `a` keeps the error of the bf16 inputs
        and weights of its products (8 significant bits, relative error up to 2^-8). Near the optimum
        a sigma / g ~ -eps, so the DSM residual a sigma / g + eps is a small difference of O(1)
        numbers, and that error of `a` is a large part of it, cast or no cast;
      * it only keeps the loss's own arithmetic in float32: the residual's subtraction, its square and
        the sums over the D = C H W dimensions and the batch add no bf16 rounding of their own.
    Also float32:
      * the SDE's coefficients (sigma^2 = -expm1(-B(s)) is tiny at small s);
      * weights, gradients, Adam's moments and the EMA: an EMA step moves a weight by 1e-4 of its
        distance to the model and an Adam step at train_img.py's lr 5e-4 by about 5e-4, both below the
        resolution of a bf16 weight (2^-8 of it) above 0.13 in magnitude;
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


def train(args, task, logger, ctx=None, signals=None):
    """Train (or resume) the run in logger.dir. Returns the EMA PluginReverseSDE in eval mode.

    ctx: this process's lib.distributed.Distributed (default: a single process on --device). signals: an active
    StopSignals; when one arrives, the run checkpoints after the iteration in progress and raises Preempted.
    """
    signals = signals or StopSignals()  # not entered: nothing is ever recorded
    ctx = ctx or Distributed(device=resolve_device(args.device))
    device = ctx.device
    seed_everything(args.seed)  # the same initial weights on every rank
    sde = build_sde(task.sde)
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
    with _agreed_writes(ctx):
        # A fresh run (start 0) also forgets what a run killed before its first checkpoint logged.
        logger.resume_at(start)
        if state is not None:
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
            try:
                save_checkpoint(ckpt_path, {
                    "kind": task.kind, "args": vars(args), "model": task.model, "sde": task.sde,
                    "gen_sde": {"T": args.T0, "vtype": args.vtype, "debias": args.debias}, "extra": task.extra,
                    "iteration": iteration, "model_state": drift.state_dict(), "ema_state": ema.shadow.state_dict(),
                    "optimizer_state": optimizer.state_dict(), "running_loss": list(running),
                    "world_size": ctx.world_size,
                })
            except OSError as err:
                raise cannot_write(ckpt_path, err, f"{_kept(ckpt_path, last_saved)}; free space or restore write "
                                   "access, then rerun the same command to resume") from None
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
        with _agreed_writes(ctx):
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
            loss_value, stop = _check_finite_step(it, loss, drift, args, ckpt_path, last_saved, ctx, signals.number)
            if args.grad_clip > 0:  # after the check: clipping would turn an infinite norm into NaN weights
                torch.nn.utils.clip_grad_norm_(drift.parameters(), args.grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(it, args)
            optimizer.step()
            ema.update(drift, it)

            loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
            last_one = it == args.num_iterations  # ends the run anyway: a stop changes nothing there
            log_now = it == 1 or it % args.print_every == 0 or last_one
            sample_now = it % args.sample_every == 0 or last_one
            save_now = it % args.checkpoint_every == 0 or last_one
            stop = None if last_one else stop
            # Under torchrun the ranks agreed on `stop` above; a single process also heeds a signal that comes
            # later in the iteration, during its evaluation or samples (which can take minutes).
            if log_now or sample_now or save_now or stop is not None or not ctx.is_distributed:
                with _agreed_writes(ctx):
                    if log_now:
                        last = evaluate(it, loss_sum / loss_count)
                        loss_sum, loss_count = 0.0, 0
                    if sample_now:
                        sample(it)
                    if not ctx.is_distributed and signals.number and not last_one:
                        stop = (signal.Signals(signals.number).name, 0)
                    if save_now or stop is not None:
                        checkpoint(it, (loss_sum, loss_count))
                    if stop is not None:
                        bar.close()
                        name, rank = stop
                        logger.line(f"Stopped by {name}" + (f" on rank {rank}" if ctx.is_distributed else "")
                                    + f" after iteration {it}: checkpoint written to {ckpt_path}; rerun the same "
                                    f"command to resume (exit status {PREEMPTED})")
            if stop is not None:
                raise Preempted()
            bar.set_postfix(loss=f"{loss_value:.4g}", **{k: f"{v:.4g}" for k, v in list(last.items())[:1]})
    finally:
        bar.close()  # before any error line, so that line does not land on the bar's
        batches.close()  # shuts down its loader's workers now, not at exit (they ignore SIGTERM: lib/image_data.py)
    with forked_rng(args.seed, Stream.FINISH, device=device), _agreed_writes(ctx):
        task.finish(ema_gen_sde, logger)
    return ema_gen_sde


@contextlib.contextmanager
def _agreed_writes(ctx):
    """Around code whose writes rank 0 alone does: a WriteError there is raised on every rank, so that none is
    left waiting for rank 0 in its next collective. Costs one gather under torchrun, none in one process; the
    block's own collectives (an evaluation's gather) must come before its writes."""
    message = None
    try:
        yield
    except WriteError as err:
        message = str(err)
    message = first_error(ctx, message)
    if message is not None:
        raise WriteError(message)


def _check_finite_step(it, loss, drift, args, ckpt_path, last_saved, ctx, signal_number=0):
    """Stop before the update when the loss (on any rank) or the gradient is not finite, so no NaN weight
    is ever saved. The values are all-reduced, so every rank decides alike and none is left waiting in a
    collective; each rank's stop signal (its number, 0 if none) rides along. Returns the loss averaged over
    ranks (the loss of the global batch) as a float, and (signal name, rank) of the first rank that got a
    stop signal, or None."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in drift.parameters() if p.grad is not None])
    values = torch.stack([loss.detach().float(), grad_norm.float(), loss.new_tensor(float(signal_number)).float()])
    table = per_rank_values(ctx, values).tolist()  # (W, 3)
    if all(math.isfinite(v) for row in table for v in row):
        stops = [(signal.Signals(int(row[2])).name, rank) for rank, row in enumerate(table) if row[2]]
        return sum(row[0] for row in table) / len(table), (stops[0] if stops else None)
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
