"""Run the training scripts in child processes that a test can kill (SIGKILL) or join into a process group.

Two ways in:
  * ``start(script, argv, faults=..., env=...)`` forks a child from a server process that imported
    torch and the scripts once (multiprocessing's forkserver), so a child starts in a fraction of a
    second instead of re-importing torch. The server has run no torch operation, so the fork
    inherits no thread pool. Children run with one intra-op thread, so runs compared bit for bit
    compute alike.
  * ``python -m child_processes '<faults as JSON>' <script> <args>``, for launchers that run commands
    (torchrun).

Faults are injected by patching inside the child only (iterations count from 1):
  kill_after_update: n     SIGKILL once iteration n's update is applied (weights changed, not saved)
  kill_mid_write: n        SIGKILL half-way through writing the checkpoint of iteration n
  kill_after_rename: n     SIGKILL right after the checkpoint of iteration n replaced the previous one
  nan_loss: [rank, n]      the loss of that rank becomes NaN at its n-th training step
  record_weights: folder   every rank saves its weights after every update, as folder/rank{r}_{n}.pt
  signal_after_update: [name, n] or [name, n, rank]
                           send signal `name` (e.g. 'SIGTERM') to this process (on that rank only) once
                           iteration n's update is applied
  signal_family_during_evaluation: [name, k]
                           at the first test batch of the k-th in-run image evaluation, send it to this process's
                           children (its data-loader workers) and a second later to this process, as a scheduler
                           signals every process of a job; the evaluation then reads its remaining batches
  signal_mid_write: [name, n]
                           send signal `name` to this process half-way through writing the checkpoint of
                           iteration n (the write then goes on)
  kill_rank_after_update: [rank, n]
                           SIGKILL that rank once iteration n's update is applied, in torchrun's first
                           attempt only (TORCHELASTIC_RESTART_COUNT 0), so the restarted group runs through
  slow_restart: [rank, seconds]
                           in torchrun's restarts (TORCHELASTIC_RESTART_COUNT > 0), that rank starts `seconds` late,
                           as ranks of a restarted group come up at different speeds
  failing_writes: {"from": n, "files": [patterns], "errno": name}
                           from iteration n's update on (0: from the start), every file opened for writing
                           whose name matches a pattern (fnmatch, e.g. 'metrics.jsonl', '*.png', '.checkpoint-*',
                           'events.*', '*') fails: its writes raise OSError(errno) (ENOSPC, EIO), or for EACCES
                           (permission lost) the opening does. Python-level writes only: builtins.open,
                           io.open and os.fdopen (torch.save, TensorBoard, PIL and matplotlib write through them).
"""
import builtins
import errno
import fnmatch
import importlib
import io
import itertools
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading

_CONTEXT = multiprocessing.get_context("forkserver")
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.utils.tensorboard", "matplotlib.pyplot",
            "torchvision", "train_toy", "train_img", "lib.training", "lib.toy_task", "lib.image_task",
            "child_processes"]


def start(script, argv, faults=None, env=None, stderr_path=None):
    """A started multiprocessing.Process running `script`.main(argv) (script: 'train_toy' or 'train_img').

    env: environment variables to set in the child (e.g. torchrun's RANK, WORLD_SIZE, ...);
    stderr_path: a file receiving the child's stderr. Its exitcode is main's exit status, or -9 when killed.
    """
    _CONTEXT.set_forkserver_preload(_PRELOAD)
    process = _CONTEXT.Process(target=run_script, args=(script, list(argv), faults or {}, env or {}, stderr_path))
    process.start()
    return process


def start_function(target, *args):
    """A started child running target(*args); target must be a module-level function (it is pickled by name)."""
    _CONTEXT.set_forkserver_preload(_PRELOAD)
    process = _CONTEXT.Process(target=_call_single_threaded, args=(target, args))
    process.start()
    return process


def start_group(script, argv, world_size, faults=None, stderr_dir=None):
    """world_size children running the script as one gloo process group, with the variables torchrun sets."""
    processes = []
    for rank, env in enumerate(torchrun_env(world_size)):
        stderr_path = None if stderr_dir is None else os.path.join(stderr_dir, f"stderr_rank{rank}.txt")
        processes.append(start(script, argv, faults, env, stderr_path))
    return processes


def torchrun_env(world_size):
    """The environment torchrun gives each of world_size processes on one machine (one dict per rank)."""
    port = free_port()
    return [{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
             "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            for rank in range(world_size)]


def join_all(processes, timeout=120):
    """Wait for the processes; returns their exit statuses (None for one still running after timeout)."""
    for p in processes:
        p.join(timeout)
    return [p.exitcode for p in processes]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, argv, faults, env, stderr_path=None):
    """In this process: set env, inject faults, then run `script`.main(argv) as `python script.py argv` would."""
    import torch
    from tqdm import tqdm

    os.environ.update(env)
    # A forkserver child inherits its start method; `python script.py` on Linux forks, so data-loader workers are
    # children of the training process, as in a real run.
    multiprocessing.set_start_method("fork", force=True)
    if stderr_path is not None:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.close(fd)
    torch.set_num_threads(1)
    # tqdm's default lock is a multiprocessing semaphore, which a SIGKILLed child would leak (a warning
    # at exit); a thread lock serves a single process as well.
    tqdm.set_lock(threading.RLock())
    for name, value in faults.items():
        _FAULTS[name](value)
    sys.argv = [f"{script}.py", *argv]
    importlib.import_module(script).main(argv)


def _call_single_threaded(target, args):
    import torch

    torch.set_num_threads(1)
    target(*args)


def _kill_self():
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap_ema_update(after):
    """Call after(model, num_updates) once each EMA update (which follows the optimizer step) is done."""
    from lib.ema import EMA

    original = EMA.update

    def update(self, model, num_updates):
        original(self, model, num_updates)
        after(model, num_updates)

    EMA.update = update


def _kill_after_update(n):
    _wrap_ema_update(lambda model, it: _kill_self() if it == n else None)


class _CheckpointWrites:
    """Patches torch.save (as lib.checkpoint calls it) to remember the iteration being written."""

    iteration = None
    kill_mid_write = None
    signal_mid_write = None  # (signal number, iteration)

    @classmethod
    def install(cls):
        import torch

        if getattr(torch.save, "_patched", False):
            return
        original = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "iteration" in obj:
                cls.iteration = obj["iteration"]
                if obj["iteration"] == cls.kill_mid_write and hasattr(f, "write"):
                    buffer = io.BytesIO()
                    original(obj, buffer, *args, **kwargs)
                    data = buffer.getvalue()
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    _kill_self()
                if cls.signal_mid_write is not None and obj["iteration"] == cls.signal_mid_write[1] and \
                        hasattr(f, "write"):
                    buffer = io.BytesIO()
                    original(obj, buffer, *args, **kwargs)
                    data = buffer.getvalue()
                    f.write(data[: len(data) // 2])
                    os.kill(os.getpid(), cls.signal_mid_write[0])  # its handler runs here, between the halves
                    f.write(data[len(data) // 2:])
                    return None
            return original(obj, f, *args, **kwargs)

        save._patched = True
        torch.save = save


def _kill_mid_write(n):
    _CheckpointWrites.kill_mid_write = n
    _CheckpointWrites.install()


def _kill_after_rename(n):
    import lib.checkpoint

    _CheckpointWrites.install()
    original = lib.checkpoint._fsync_dir

    def fsync_dir(folder):  # called right after the rename
        if _CheckpointWrites.iteration == n:
            _kill_self()
        original(folder)

    lib.checkpoint._fsync_dir = fsync_dir


def _signal_mid_write(spec):
    name, n = spec
    _CheckpointWrites.signal_mid_write = (getattr(signal, name), n)
    _CheckpointWrites.install()


def _signal_after_update(spec):
    name, n, *rank = spec

    def send(model, it):
        if it == n and (not rank or int(os.environ.get("RANK", "0")) == rank[0]):
            os.kill(os.getpid(), getattr(signal, name))

    _wrap_ema_update(send)


def _signal_family_during_evaluation(spec):
    import time

    import lib.evaluation
    import lib.image_task

    name, k = spec
    evaluations, batches = itertools.count(1), None
    evaluate, batch_bits_per_dim = lib.image_task.ImageTask.evaluate, lib.evaluation.batch_bits_per_dim

    def counted_evaluate(self, gen_sde, iteration):
        nonlocal batches
        batches = itertools.count(1) if next(evaluations) == k else None
        return evaluate(self, gen_sde, iteration)

    def signalling_batch(*args, **kwargs):
        if batches is not None and next(batches) == 1:
            children = _descendants(os.getpid())
            assert children, "no child processes to signal (run the loaders with --num_workers >= 1)"
            for pid in children:
                os.kill(pid, getattr(signal, name))
            time.sleep(1.0)  # time for a worker to die of it
            os.kill(os.getpid(), getattr(signal, name))
        return batch_bits_per_dim(*args, **kwargs)

    lib.image_task.ImageTask.evaluate = counted_evaluate
    lib.evaluation.batch_bits_per_dim = signalling_batch


def _descendants(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        children = [int(child) for child in fh.read().split()]
    return children + [d for child in children for d in _descendants(child)]


def _kill_rank_after_update(spec):
    rank, n = spec
    if int(os.environ.get("RANK", "0")) == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        _kill_after_update(n)


def _slow_restart(spec):
    import time

    rank, seconds = spec
    if int(os.environ.get("RANK", "0")) == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        time.sleep(seconds)


class _FailingFile:
    """A file opened for writing on a disk that refuses more data: every write raises OSError(code)."""

    def __init__(self, fh, code):
        self._fh, self._code = fh, code

    def write(self, data):
        raise OSError(self._code, os.strerror(self._code))

    writelines = write

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._fh.close()

    def __iter__(self):
        return iter(self._fh)


def _failing_writes(spec):
    code = getattr(errno, spec.get("errno", "ENOSPC"))
    patterns = spec["files"]
    original_open = io.open
    active = spec.get("from", 0) == 0

    def failing_open(file, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fsdecode(file)
        name = os.path.basename(path)
        if not (active and writing and any(fnmatch.fnmatch(name, p) for p in patterns)):
            return original_open(file, mode, *args, **kwargs)
        if code == errno.EACCES:
            raise PermissionError(code, os.strerror(code), path)
        return _FailingFile(original_open(file, mode, *args, **kwargs), code)

    def activate(model, it):
        nonlocal active
        active = active or it == spec["from"]

    builtins.open = io.open = failing_open  # os.fdopen calls io.open
    _wrap_ema_update(activate)


def _nan_loss(spec):
    from lib.sdes import PluginReverseSDE

    rank, n = spec
    original = PluginReverseSDE.dsm
    steps = itertools.count(1)

    def dsm(self, x):
        loss = original(self, x)
        if int(os.environ.get("RANK", "0")) == rank and next(steps) == n:
            return loss * float("nan")
        return loss

    PluginReverseSDE.dsm = dsm


def _record_weights(folder):
    import torch

    def record(model, it):
        rank = int(os.environ.get("RANK", "0"))
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(weights, os.path.join(folder, f"rank{rank}_{it}.pt"))

    _wrap_ema_update(record)


_FAULTS = {"kill_after_update": _kill_after_update, "kill_mid_write": _kill_mid_write,
           "kill_after_rename": _kill_after_rename, "nan_loss": _nan_loss, "record_weights": _record_weights,
           "signal_after_update": _signal_after_update, "signal_mid_write": _signal_mid_write,
           "signal_family_during_evaluation": _signal_family_during_evaluation,
           "kill_rank_after_update": _kill_rank_after_update, "failing_writes": _failing_writes,
           "slow_restart": _slow_restart}


if __name__ == "__main__":
    run_script(sys.argv[2], sys.argv[3:], json.loads(sys.argv[1]), {})
