"""What a run leaves in its folder (docs/math.md section 7).

    args.json       the command-line arguments
    log.txt         one plain-text line per evaluation (appended across resumes)
    metrics.jsonl   one JSON object per evaluation
    events.*        TensorBoard scalars and images
    *.png           figures and sample grids

Only the process that owns the run writes (rank 0 under torch.distributed); the others get a
logger whose methods do nothing, so call sites need no rank checks.

A write that fails (disk full, I/O error, permission lost) raises lib.files.WriteError, one line naming
the file and the cause, for the log, metrics, arguments and TensorBoard events; the run stops there and
resumes from its last checkpoint once the disk is fixed. Figures and sample grids are not needed to
resume or to read the results: a failure there prints one warning (the first time) and training goes on.
Files that are rewritten whole (args.json, metrics.jsonl on resume, PNGs) are replaced atomically.
"""
import json
import os
import sys
import threading
import time

from tqdm import tqdm

from lib.files import atomic_path, cannot_write, reason, write_text

RESUME_HINT = "free space or restore write access, then rerun the same command to resume from the last checkpoint"


class RunLogger:
    def __init__(self, run_dir, enabled=True):
        self.dir = run_dir
        self.enabled = enabled
        self._writer = None
        self._purge_step = None
        self._start = time.time()
        self._warned = False  # about a figure that could not be written
        self._thread_hook = None  # the threading.excepthook in place before the TensorBoard writer started
        if enabled:
            os.makedirs(run_dir, exist_ok=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    @property
    def writer(self):
        """The TensorBoard SummaryWriter, opened on first use (importing TensorBoard is slow)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard writes from a thread of its own. A failed write ends that thread, which Python reports
            # as a traceback on stderr; the error is raised again here at the next flush, and reported in one
            # line by _tensorboard, so the thread's report is silenced while this logger is open.
            self._thread_hook = threading.excepthook
            threading.excepthook = self._quiet_tensorboard_thread
            self._writer = SummaryWriter(self.dir, purge_step=self._purge_step)
        return self._writer

    def _quiet_tensorboard_thread(self, args):
        if not type(args.thread).__module__.startswith("tensorboard."):
            self._thread_hook(args)

    def _tensorboard(self, add):
        """add(writer), then flush, so that a failed write surfaces here as a WriteError naming the events file."""
        try:
            add(self.writer)
            self.writer.flush()
        except OSError as err:
            raise cannot_write(self._events_file(self._writer), err, RESUME_HINT) from None

    def _events_file(self, writer):
        """The events file's path; if the writer failed before it could say, the one it created, if any."""
        event_writer = getattr(getattr(writer, "file_writer", None), "event_writer", None)
        if getattr(event_writer, "_file_name", None):
            return event_writer._file_name
        files = [os.path.join(self.dir, f) for f in os.listdir(self.dir) if f.startswith("events.out.tfevents.")]
        files = [f for f in files if os.path.getmtime(f) >= self._start]  # not an earlier run's
        return max(files, key=os.path.getmtime) if files else os.path.join(self.dir, "events.out.tfevents.*")

    def resume_at(self, iteration):
        """Forget what a killed run logged after its last checkpoint, so resumed logs have no duplicates."""
        if not self.enabled:
            return
        self._purge_step = iteration + 1
        path = self.path("metrics.jsonl")
        if os.path.exists(path):
            with open(path) as fh:
                kept = [line for line in fh if _iteration_of(line) <= iteration]
            try:  # rewritten whole: on a full disk a plain rewrite would truncate the metrics and stop there
                write_text(path, "".join(kept))
            except OSError as err:
                raise cannot_write(path, err, RESUME_HINT) from None

    def save_args(self, args):
        if self.enabled:
            path = self.path("args.json")
            try:
                write_text(path, json.dumps(vars(args), indent=2, sort_keys=True))
            except OSError as err:
                raise cannot_write(path, err, RESUME_HINT) from None

    def line(self, text):
        """Print (above any progress bar) and append to log.txt."""
        if not self.enabled:
            return
        tqdm.write(text)
        self._append("log.txt", text + "\n")

    def metrics(self, iteration, values):
        """Append one JSON object to metrics.jsonl and write each value as a TensorBoard scalar."""
        if not self.enabled:
            return
        record = {"iteration": iteration, **values, "wall_time": round(time.time() - self._start, 3)}
        self._append("metrics.jsonl", json.dumps(record) + "\n")  # a line torn by a failure is dropped on resume

        def add(writer):
            for tag, value in values.items():
                writer.add_scalar(tag, value, iteration)

        self._tensorboard(add)

    def image(self, tag, grid, iteration, filename=None):
        """grid: (C, H, W) in [0, 1], to TensorBoard and, given a filename, as a PNG in the run folder."""
        if not self.enabled:
            return
        if filename is not None:
            from torchvision.utils import save_image

            self._figure_file(filename, lambda tmp: save_image(grid, tmp))
        self._tensorboard(lambda writer: writer.add_image(tag, grid, iteration))

    def figure(self, tag, fig, iteration, filename):
        """Save a matplotlib figure as PNG in the run folder and to TensorBoard, then close it."""
        if not self.enabled:
            import matplotlib.pyplot as plt

            plt.close(fig)  # built on every rank, kept by none but rank 0
            return
        self._figure_file(filename, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
        self._tensorboard(lambda writer: writer.add_figure(tag, fig, iteration, close=True))

    def close(self, quietly=False):
        """Close the TensorBoard writer: WriteError if its last events cannot be written, unless `quietly` (when
        another error is being reported)."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        except OSError as err:
            if not quietly:
                raise cannot_write(self._events_file(writer), err, RESUME_HINT) from None
        finally:
            if threading.excepthook == self._quiet_tensorboard_thread:
                threading.excepthook = self._thread_hook

    def _append(self, name, text):
        path = self.path(name)
        try:
            with open(path, "a") as fh:
                fh.write(text)
        except OSError as err:
            raise cannot_write(path, err, RESUME_HINT) from None

    def _figure_file(self, filename, save):
        """save(temporary path) for a figure written atomically; on failure, warn the first time and go on."""
        path = self.path(filename)
        try:
            with atomic_path(path) as tmp:
                save(tmp)
        except OSError as err:
            if not self._warned:
                self._warned = True
                tqdm.write(f"warning: cannot write {path} ({reason(err)}); training goes on without it "
                           "(figures that fail later are skipped without a warning)", file=sys.stderr)


def _iteration_of(line):
    """The iteration of a metrics.jsonl line; infinite for a blank or torn one (a kill mid-write), so it is dropped."""
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
