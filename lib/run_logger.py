"""What a run leaves in its folder (docs/math.md section 7).

    args.json       the command-line arguments
    log.txt         one plain-text line per evaluation (appended across resumes)
    metrics.jsonl   one JSON object per evaluation
    events.*        TensorBoard scalars and images
    *.png           figures and sample grids

Only the process that owns the run writes (rank 0 under torch.distributed); the others get a
logger whose methods do nothing, so call sites need no rank checks.
"""
import json
import os
import time

from tqdm import tqdm


class RunLogger:
    def __init__(self, run_dir, enabled=True):
        self.dir = run_dir
        self.enabled = enabled
        self._writer = None
        self._purge_step = None
        self._start = time.time()
        if enabled:
            os.makedirs(run_dir, exist_ok=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    @property
    def writer(self):
        """The TensorBoard SummaryWriter, opened on first use (importing TensorBoard is slow)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.dir, purge_step=self._purge_step)
        return self._writer

    def resume_at(self, iteration):
        """Forget what a killed run logged after its last checkpoint, so resumed logs have no duplicates."""
        if not self.enabled:
            return
        self._purge_step = iteration + 1
        path = self.path("metrics.jsonl")
        if os.path.exists(path):
            with open(path) as fh:
                kept = [line for line in fh if _iteration_of(line) <= iteration]
            with open(path, "w") as fh:
                fh.writelines(kept)

    def save_args(self, args):
        if self.enabled:
            with open(self.path("args.json"), "w") as fh:
                json.dump(vars(args), fh, indent=2, sort_keys=True)

    def line(self, text):
        """Print (above any progress bar) and append to log.txt."""
        if not self.enabled:
            return
        tqdm.write(text)
        with open(self.path("log.txt"), "a") as fh:
            fh.write(text + "\n")

    def metrics(self, iteration, values):
        """Append one JSON object to metrics.jsonl and write each value as a TensorBoard scalar."""
        if not self.enabled:
            return
        record = {"iteration": iteration, **values, "wall_time": round(time.time() - self._start, 3)}
        with open(self.path("metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, iteration)
        self.writer.flush()

    def image(self, tag, grid, iteration, filename=None):
        """grid: (C, H, W) in [0, 1], to TensorBoard and, given a filename, as a PNG in the run folder."""
        if not self.enabled:
            return
        if filename is not None:
            from torchvision.utils import save_image

            save_image(grid, self.path(filename))
        self.writer.add_image(tag, grid, iteration)
        self.writer.flush()

    def figure(self, tag, fig, iteration, filename):
        """Save a matplotlib figure as PNG in the run folder and to TensorBoard, then close it."""
        if not self.enabled:
            import matplotlib.pyplot as plt

            plt.close(fig)  # built on every rank, kept by none but rank 0
            return
        fig.savefig(self.path(filename), dpi=110, bbox_inches="tight")
        self.writer.add_figure(tag, fig, iteration, close=True)
        self.writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


def _iteration_of(line):
    """The iteration of a metrics.jsonl line; infinite for a blank or torn one (a kill mid-write), so it is dropped."""
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
