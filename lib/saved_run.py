"""A trained run opened for the tools that read it (sample.py, evaluate.py): its model and its task."""
import os
from dataclasses import dataclass

import torch

from lib.checkpoint import CheckpointError, load_run
from lib.pixels import LOGIT_ALPHA
from lib.task import Task, task_from_checkpoint


@dataclass
class SavedRun:
    """gen_sde: the EMA PluginReverseSDE in eval mode; task: the run's lib.task.Task, rebuilt from the
    checkpoint's arguments; iteration: training iterations done; dir: the run folder."""

    gen_sde: torch.nn.Module
    task: Task
    iteration: int
    dir: str


def open_run(path, device):
    """The run whose checkpoint is at `path`, on `device`; CheckpointError with a one-line message when the
    file is missing, unreadable, foreign, or written by a kind of run these tools do not know."""
    gen_sde, state = load_run(path, map_location=device)
    try:
        task = task_from_checkpoint(state)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    extra = state.get("extra", {})
    if extra.get("real") and extra.get("logit_alpha", LOGIT_ALPHA) != LOGIT_ALPHA:
        # lib.pixels transforms with its constant: a run trained with another one would be mis-scored
        raise CheckpointError(f"{path} was trained with logit alpha {extra['logit_alpha']}, this code transforms "
                              f"with {LOGIT_ALPHA}")
    return SavedRun(gen_sde, task, state.get("iteration"), os.path.dirname(os.path.abspath(path)))
