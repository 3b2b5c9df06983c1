"""A task is what one kind of run knows: its data, network, SDE, evaluation and figures.

The training loop (lib/training.py) and the tools (sample.py, evaluate.py) use the same task object:
the loop builds it from the command line, the tools from the arguments a checkpoint stored
(`task_from_checkpoint`), so a tool never re-derives what the training side knows. Two kinds:
`lib.toy_task.ToyTask` ('toy', the swiss roll) and `lib.image_task.ImageTask` ('img', MNIST and CIFAR-10).
"""
import abc
import argparse

# Arguments any run may change when it resumes: how long it runs, where its files go, how it computes
# and what it reports, never what it learns. Each task adds its own (Task.resumable_args).
LOOP_RESUMABLE_ARGS = frozenset({
    "num_iterations", "print_every", "sample_every", "checkpoint_every", "device", "num_steps", "saveroot",
    "expname", "amp", "compile",
})


class Task(abc.ABC):
    """Built from a run's arguments (an argparse.Namespace or the dict a checkpoint stores).

    rank, world_size: this process's place under torchrun (tools use one process).
    """

    kind: str
    resumable_args = frozenset()  # this task's arguments that may change on resume (besides LOOP_RESUMABLE_ARGS)
    # Arguments added after checkpoints were first written, with the value that reproduces what runs without them
    # did: a stored run that lacks one is read (and resumed) with that value.
    legacy_args = {"sde": "vp", "grad_clip": 0.0}
    channels_last = False  # keep the network (and so its activations) in channels_last memory format

    def __init__(self, args, rank=0, world_size=1):
        if not isinstance(args, argparse.Namespace):
            args = argparse.Namespace(**{**self.legacy_args, **args})
        self.args = args
        self.rank, self.world_size = rank, world_size

    # --- what the checkpoint records ---------------------------------------------------------------

    @property
    @abc.abstractmethod
    def model(self):
        """{'name': a registered drift network (lib.models), 'kwargs': its constructor arguments}."""

    @property
    def sde(self):
        """The SDE's spec (lib.sdes.build_sde): --sde with the schedule every task uses."""
        return {"name": self.args.sde, "beta_min": 0.1, "beta_max": 20.0, "T": self.args.T0}

    @property
    def extra(self):
        """Plain-type metadata stored in the checkpoint beside the arguments."""
        return {}

    @property
    @abc.abstractmethod
    def sample_shape(self):
        """The shape of one example: (2,) or (C, H, W)."""

    # --- training ----------------------------------------------------------------------------------

    def prepare(self):
        """Check what training needs (data present, sizes possible) before any work; ConfigError otherwise."""

    @abc.abstractmethod
    def batches(self, start, device):
        """This rank's training batches (B / world_size, ...) for iterations start + 1, start + 2, ..."""

    @abc.abstractmethod
    def evaluate(self, gen_sde, iteration):
        """In-run evaluation of the EMA model (eval mode) -> dict of scalars, equal on every rank."""

    @abc.abstractmethod
    def describe(self, iteration, loss, metrics):
        """The log line of one evaluation."""

    @abc.abstractmethod
    def sample(self, gen_sde, iteration, logger):
        """Write the in-run figures or sample grids (called on every rank; the logger writes on rank 0)."""

    def finish(self, gen_sde, logger):
        """After the last iteration (optional)."""

    # --- tools (evaluate.py, sample.py) ------------------------------------------------------------

    @abc.abstractmethod
    def likelihood_report(self, estimate, name, device, seed, num_eval=None, batch_size=None, dataroot=None):
        """{name: mean, name_std_err: ..., ...} of `estimate` (x (B, ...) -> log-likelihood (B,) nats) on the
        held-out data; seed: evaluate.py's --seed."""

    @abc.abstractmethod
    def default_elbo_repeats(self):
        """ELBO draws averaged per example when evaluate.py is not told."""

    @abc.abstractmethod
    def default_divergence(self):
        """The probability-flow likelihood's divergence when evaluate.py is not told: 'exact' or a probe."""

    @abc.abstractmethod
    def save_samples(self, x, path, title, seed):
        """Save samples x (B, ...) as a figure at `path`; returns a dict of quality figures (may be empty)."""


def device_of(module):
    """The device a module's parameters live on."""
    return next(module.parameters()).device


def task_from_checkpoint(state):
    """The task of the run that wrote a checkpoint, rebuilt from its stored arguments."""
    from lib.image_task import ImageTask
    from lib.toy_task import ToyTask

    tasks = {task.kind: task for task in (ToyTask, ImageTask)}
    kind = state.get("kind")
    if kind not in tasks:
        raise ValueError(f"unknown kind of run {kind!r}; known: {', '.join(sorted(tasks))}")
    return tasks[kind].from_stored_args(dict(state.get("args", {})))
