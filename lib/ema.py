"""Exponential moving average of a network's weights, the weights used to evaluate and sample."""
import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds `shadow`, a frozen copy of `model` whose parameters track decay * shadow + (1 - decay) * model.

    Buffers (e.g. normalisation statistics) are copied, not averaged. decay = 0 makes the shadow
    equal to the model after every update. The decay used at update n is min(decay, (1 + n) / (10 + n)),
    so a short run is not evaluated on weights still dominated by their random initialisation
    (0.999 ** 300 = 0.74). It depends only on n, so a resumed run averages exactly as before.
    """

    def __init__(self, model, decay=0.999):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, num_updates):
        """Average in `model`'s weights; num_updates counts the updates so far, this one included."""
        decay = min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        for ema_p, p in zip(self.shadow.parameters(), model.parameters()):
            ema_p.lerp_(p, 1.0 - decay)
        for ema_b, b in zip(self.shadow.buffers(), model.buffers()):
            ema_b.copy_(b)
