"""Checkpoints: weights + configuration + iteration, as tensors and plain types.

Written atomically (temporary file in the same folder, fsync, rename), so a kill at any moment
leaves the previous or the new checkpoint, never a torn one. Read with `weights_only=True`, so a
checkpoint cannot run code. A checkpoint is a dict:

    format, version      identify the file as ours
    kind                 'toy' or 'img' (lib.task: the task rebuilt from `args` by task_from_checkpoint)
    args                 the run's command-line arguments (plain types)
    model                {'name': registered drift network, 'kwargs': its constructor arguments}
    sde                  the SDE's name and constructor arguments (lib.sdes.build_sde; no name: VP)
    gen_sde              {'T', 'vtype', 'debias'}
    extra                task metadata (toy: noise; img: dataset, real, logit_alpha, shape)
    iteration            the last completed training iteration
    model_state, ema_state, optimizer_state   state dicts of the unwrapped network, so no 'module.'
                         (DDP) or '_orig_mod.' (torch.compile) prefixes
    running_loss         (sum, count) of the losses since the last log line
    world_size           the number of processes that trained it

Resuming (`read_for_resume`, `restore_training_state`): a checkpoint resumes only the run that wrote it,
with the same task and the same arguments except those that change how long a run lasts, where it
writes, how it computes or what it reports (lib.task.LOOP_RESUMABLE_ARGS and each task's own).
"""
import os
import tempfile

import torch

from lib.distributed import broadcast_from_main
from lib.files import PARTIAL_PREFIX
from lib.models import build_drift
from lib.sdes import PluginReverseSDE, build_sde
from lib.task import LOOP_RESUMABLE_ARGS

FORMAT = "sdeflow-checkpoint"
VERSION = 1
_PARTIAL = (".checkpoint-", ".tmp")  # prefix and suffix of a write in progress


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file and what to do."""


def save_checkpoint(path, state):
    """Write `state` (a dict of tensors and plain types) to `path` atomically."""
    state = {"format": FORMAT, "version": VERSION, **state}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_PARTIAL[0], suffix=_PARTIAL[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            out = _WriteErrors(fh)
            try:
                torch.save(state, out)
            except RuntimeError:
                if out.error is not None:  # a failed write (disk full) that torch reports as a stream error
                    raise out.error from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass  # the error that brought us here is the one to report
        raise
    _fsync_dir(folder)  # make the rename itself durable


class _WriteErrors:
    """A file for torch.save that remembers the first OSError of a write: torch's C++ writer can report a failed
    write as a RuntimeError about stream positions, and the OSError (e.g. no space left) is the cause to report."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data):
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        self.fh.flush()

    def fileno(self):
        return self.fh.fileno()


def remove_partial_writes(folder):
    """Delete the temporary files of writes that a kill interrupted (checkpoint, figures, arguments: the files
    they were to replace are intact)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if (name.startswith(_PARTIAL[0]) and name.endswith(_PARTIAL[1])) or name.startswith(PARTIAL_PREFIX):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass  # left for a later run; it never stands in for a finished file


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by `save_checkpoint`; CheckpointError if it is missing, corrupt or foreign."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: give the path of a run's checkpoint.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torn, truncated, or pickled objects we refuse to execute
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {reason[:120]}); "
            "delete it to start afresh or pick another --expname"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an sdeflow checkpoint; delete it to start afresh or pick another --expname"
        )
    version = state.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this code (checkpoint version {version}, "
                              f"this code reads {VERSION}): update the code")
    if version != VERSION:
        raise CheckpointError(f"{path} has an unknown checkpoint version {version!r} (this code reads {VERSION}); "
                              "it was not written by this code: use a run's checkpoint.pt")
    return state


def build_gen_sde(state):
    """Rebuild the PluginReverseSDE described by a checkpoint (weights not loaded)."""
    sde = build_sde(state["sde"])
    drift = build_drift(state["model"]["name"], state["model"]["kwargs"])
    cfg = state["gen_sde"]
    return PluginReverseSDE(sde, drift, cfg["T"], vtype=cfg["vtype"], debias=cfg["debias"])


def load_model(path, map_location="cpu"):
    """The trained PluginReverseSDE of a run, in eval mode, with the EMA weights when the run kept them."""
    return load_run(path, map_location)[0]


def load_run(path, map_location="cpu"):
    """(load_model's PluginReverseSDE, the checkpoint dict): for tools that also need 'kind', 'args', 'extra'."""
    state = load_checkpoint(path, map_location=map_location)
    try:
        gen_sde = build_gen_sde(state)
        weights = state.get("ema_state") or state["model_state"]
        gen_sde.a.load_state_dict(weights)  # strict: a mismatch is an error, never a silent partial load
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # fields damaged or edited by hand
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} does not describe a model this code can build ({type(err).__name__}: "
                              f"{reason}); use a checkpoint.pt written by train_toy.py or train_img.py") from None
    return gen_sde.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval(), state


def read_for_resume(path, args, task, ctx):
    """The run's checkpoint (None for a fresh run), read and checked by rank 0 and handed to every rank.

    CheckpointError (on every rank) when it is unreadable or was written by another run.
    """
    state, message = None, None
    if ctx.is_main and os.path.exists(path):
        try:
            state = load_checkpoint(path, map_location="cpu")
            check_same_run(state, args, task, path)
        except CheckpointError as err:
            state, message = None, str(err)
    state, message = broadcast_from_main(ctx, (state, message))
    if message is not None:
        raise CheckpointError(message)
    return state


def check_same_run(state, args, task, path):
    """A checkpoint may only resume the run that wrote it: same task kind and same learning-relevant arguments.

    task: has `kind` and `resumable_args` (lib.task.Task).
    """
    if state.get("kind") != task.kind:
        raise CheckpointError(f"{path} was written by a {state.get('kind')} run, not {task.kind}; "
                              "delete it or pick another --expname")
    saved, now = state.get("args"), vars(args)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} holds no run arguments; delete it or pick another --expname")
    # Runs written before an argument existed behaved as its legacy value.
    saved, now = {**task.legacy_args, **saved}, {**task.legacy_args, **now}
    resumable = LOOP_RESUMABLE_ARGS | task.resumable_args
    if now.get("lr_schedule") == "cosine":  # the cosine's horizon is --num_iterations: it is part of the schedule
        resumable = resumable - {"num_iterations"}
    # All differences in one message: a default that changed since the run began is one of them.
    differ = [key for key in sorted(set(saved) | set(now)) if key not in resumable and saved.get(key) != now.get(key)]
    if differ:
        then = " ".join(f"--{key}={saved.get(key)}" for key in differ)
        raise CheckpointError(f"{path} was written with {then}, this command has "
                              f"{' '.join(f'--{key}={now.get(key)}' for key in differ)}; pass {then} to resume, "
                              "or pick another --expname")


def restore_training_state(state, drift, ema, optimizer, path):
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


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)
