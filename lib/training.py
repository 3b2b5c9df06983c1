"""The training loop shared by train_toy.py and train_img.py: set-up, step, evaluate, log, checkpoint.

The scripts differ only in a `Task` (data, network, evaluation, samples). The loop owns
everything that must be identical for both: seeding, Adam + EMA, the divergence guard,
resuming from `checkpoint.pt`, and the schedule of evaluations, samples and checkpoints.

Exact resume: training batches are a pure function of (seed, iteration) (see the tasks), the
loss's own noise comes from torch's global RNG, whose state is checkpointed with the weights,
and evaluations run on a forked RNG so how often one evaluates never changes the training.
"""
import math
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from lib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lib.config import ConfigError, check_writable_dir, fail, resolve_device
from lib.ema import EMA
from lib.models import build_drift
from lib.run_logger import RunLogger
from lib.sdes import PluginReverseSDE, VariancePreservingSDE

# Arguments that may differ when a run is resumed: they change how long it runs or what it
# reports, never what it learns.
RESUMABLE_ARGS = {
    "num_iterations", "print_every", "sample_every", "checkpoint_every", "device", "num_workers",
    "test_batch_size", "num_eval", "lambdas", "num_steps", "lmbd", "num_samples",
}


class TrainingDiverged(Exception):
    """A non-finite loss or gradient; the message is one line and the last checkpoint is untouched."""


@dataclass
class Task:
    """What differs between the toy and the image script.

    kind:      'toy' or 'img' (stored in the checkpoint)
    model:     {'name': ..., 'kwargs': {...}} for lib.models.build_drift
    sde:       VariancePreservingSDE keyword arguments
    batches:   batches(start_iteration, device) -> iterator of training batches (B, ...) for
               iterations start_iteration + 1, start_iteration + 2, ...
    evaluate:  evaluate(gen_sde, iteration) -> dict of scalars (EMA model, eval mode)
    describe:  describe(iteration, loss, metrics) -> the log line
    sample:    sample(gen_sde, iteration, logger) -> None, writes figures / grids
    finish:    finish(gen_sde, logger) -> None, after the last iteration (optional)
    extra:     plain-type metadata stored in the checkpoint (e.g. image shape, logit transform)
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


def run(args, make_task, user_errors=()):
    """Entry point shared by the scripts: check the set-up, train, and turn user errors into one line.

    make_task(args) -> Task. user_errors: further exception types whose message is for the user.
    """
    try:
        resolve_device(args.device)
        check_writable_dir(args.saveroot)
        logger = RunLogger(os.path.join(args.saveroot, args.expname))
        try:
            train(args, make_task(args), logger)
        finally:
            logger.close()
    except (ConfigError, CheckpointError, TrainingDiverged, *user_errors) as err:
        fail(f"{os.path.basename(sys.argv[0])}: error: {err}")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(args, task, logger):
    """Train (or resume) the run in logger.dir. Returns the EMA PluginReverseSDE in eval mode."""
    device = resolve_device(args.device)
    seed_everything(args.seed)
    sde = VariancePreservingSDE(**task.sde)
    drift = build_drift(task.model["name"], task.model["kwargs"]).to(device)
    gen_sde = PluginReverseSDE(sde, drift, args.T0, vtype=args.vtype, debias=args.debias)
    ema = EMA(drift, args.ema_decay)
    ema_gen_sde = PluginReverseSDE(sde, ema.shadow, args.T0, vtype=args.vtype, debias=args.debias).eval()
    optimizer = torch.optim.Adam(drift.parameters(), lr=args.lr)

    ckpt_path = logger.path("checkpoint.pt")
    start = 0
    if os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path, map_location=device)
        _check_same_run(state, args, task, ckpt_path)
        drift.load_state_dict(state["model_state"])
        ema.shadow.load_state_dict(state["ema_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        _set_rng_state(state["rng_state"], device)
        start = state["iteration"]
        logger.resume_at(start)
        logger.line(f"Resuming from {ckpt_path} at iteration {start}")
    logger.save_args(args)

    def checkpoint(iteration):
        save_checkpoint(ckpt_path, {
            "kind": task.kind, "args": vars(args), "model": task.model, "sde": task.sde,
            "gen_sde": {"T": args.T0, "vtype": args.vtype, "debias": args.debias}, "extra": task.extra,
            "iteration": iteration, "model_state": drift.state_dict(), "ema_state": ema.shadow.state_dict(),
            "optimizer_state": optimizer.state_dict(), "rng_state": _get_rng_state(device),
        })

    def evaluate(iteration, loss):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed + 7919 * iteration)
            metrics = task.evaluate(ema_gen_sde, iteration)
        logger.metrics(iteration, {"loss": loss, **metrics})
        logger.line(task.describe(iteration, loss, metrics))
        return metrics

    def sample(iteration):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed + 104729 * iteration)
            task.sample(ema_gen_sde, iteration, logger)

    if start >= args.num_iterations:
        logger.line(f"Run already complete at iteration {start} (raise --num_iterations to continue)")
        return ema_gen_sde

    batches = task.batches(start, device)
    gen_sde.train()
    running, count, last = 0.0, 0, {}
    bar = tqdm(range(start + 1, args.num_iterations + 1), initial=start, total=args.num_iterations,
               disable=not logger.enabled, dynamic_ncols=True)
    for it in bar:
        x = next(batches)
        loss = gen_sde.dsm(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(drift.parameters(), max_norm=math.inf)
        _guard(it, loss, grad_norm, args, ckpt_path)
        optimizer.step()
        ema.update(drift, it)

        running, count = running + loss.item(), count + 1
        if it == 1 or it % args.print_every == 0 or it == args.num_iterations:
            last = evaluate(it, running / count)
            running, count = 0.0, 0
        if it % args.sample_every == 0 or it == args.num_iterations:
            sample(it)
        if it % args.checkpoint_every == 0 or it == args.num_iterations:
            checkpoint(it)
        bar.set_postfix(loss=f"{loss.item():.4g}", **{k: f"{v:.4g}" for k, v in list(last.items())[:1]})
    bar.close()
    if task.finish is not None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed + 1)
            task.finish(ema_gen_sde, logger)
    return ema_gen_sde


def _guard(it, loss, grad_norm, args, ckpt_path):
    """Stop on a non-finite loss or gradient before the optimiser step, so no NaN weight is ever saved."""
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
        return
    what = f"loss is {loss.item()}" if not torch.isfinite(loss) else f"gradient norm is {grad_norm.item()}"
    kept = f"the last checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else "no checkpoint was written"
    raise TrainingDiverged(
        f"training diverged at iteration {it}: {what}; stopped before the update, {kept}; "
        f"try a lower --lr (now {args.lr:g})"
    )


def _check_same_run(state, args, task, path):
    """A checkpoint may only resume the run that wrote it: same task and same learning-relevant arguments."""
    if state.get("kind") != task.kind:
        raise CheckpointError(f"{path} was written by a {state.get('kind')} run, not {task.kind}; "
                              "delete it or pick another --expname")
    saved, now = state["args"], vars(args)
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_ARGS or saved.get(key) == now.get(key):
            continue
        raise CheckpointError(
            f"{path} was written with --{key}={saved.get(key)}, this command has --{key}={now.get(key)}; "
            "use the same arguments to resume, or pick another --expname"
        )


def _get_rng_state(device):
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _python_state_to_plain(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]
