"""A trained run opened for the tools that read it (sample.py, evaluate.py): the model, what kind of run
it was, and its data transform, checked once."""
import os
from dataclasses import dataclass

import torch

from lib.checkpoint import load_run
from lib.config import ConfigError
from lib.image_task import LOGIT_ALPHA, to_image, to_model_space

KINDS = ("toy", "img")


@dataclass
class SavedRun:
    """gen_sde: the EMA PluginReverseSDE in eval mode; state: the checkpoint dict; dir: the run folder."""

    gen_sde: torch.nn.Module
    state: dict
    dir: str

    @property
    def kind(self):
        return self.state["kind"]

    @property
    def iteration(self):
        return self.state.get("iteration")

    @property
    def args(self):
        """The training command line (plain types)."""
        return self.state.get("args", {})

    @property
    def extra(self):
        """Task metadata: toy {'noise'}; img {'dataset', 'real', 'logit_alpha', 'shape'}."""
        return self.state.get("extra", {})

    @property
    def sample_shape(self):
        """The shape of one example, (2,) or (C, H, W)."""
        return (2,) if self.kind == "toy" else tuple(self.extra["shape"])

    def to_model_space(self, x):
        """Dequantized images x in [0, 1) -> (data the SDE runs on, log|d data / d x| (B,)), as in training."""
        return to_model_space(x, self.extra["real"])

    def to_image(self, z):
        """Model space -> images in [0, 1], for viewing."""
        return to_image(z, self.extra["real"])


def open_run(path, device):
    """The run whose checkpoint is at `path`, on `device`; CheckpointError (missing, unreadable, foreign
    file) or ConfigError (a run these tools do not know) with a one-line message."""
    gen_sde, state = load_run(path, map_location=device)
    kind = state.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{path} holds a run of kind {kind!r}; these tools read {' and '.join(KINDS)} runs")
    if kind == "img":
        alpha = state.get("extra", {}).get("logit_alpha", LOGIT_ALPHA)
        if state["extra"].get("real") and alpha != LOGIT_ALPHA:
            # to_model_space uses the library's constant: a run trained with another one would be mis-scored
            raise ConfigError(f"{path} was trained with logit alpha {alpha}, this code transforms with {LOGIT_ALPHA}")
    return SavedRun(gen_sde, state, os.path.dirname(os.path.abspath(path)))
