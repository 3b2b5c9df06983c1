"""Helpers shared by the speed benchmarks (unet_speed.py, throughput.py): the machine and command
line they report, the image U-Net configurations, wall/CPU timing and peak memory. The script that
imports it puts the repository root on sys.path; the JSON record of a run is benchmarks/report.py's.

Timing: wall-clock seconds (after a device synchronisation on CUDA) and the process's CPU seconds.
On a CPU shared with other processes the wall clock also counts the time they take; with one thread
the CPU time does not, so it is the steadier of the two there. With several threads on a busy CPU,
OpenMP's default of spinning while it waits for a descheduled partner thread can slow a step by 10x
or more (seen here: a 0.3 s MNIST step took 10 s on 2 threads beside other jobs); OMP_WAIT_POLICY=PASSIVE
in the environment makes waiting threads sleep instead, which `describe` reports.
"""
import ctypes
import gc
import os
import time

import torch
from report import command_line, cpu_model  # noqa: F401 (command_line: the benchmarks import it from here)

from lib.config import ConfigError, device_name, positive_int, resolve_device  # noqa: E402
from lib.image_data import INFO  # noqa: E402
from lib.image_task import UNET  # noqa: E402

DATASETS = tuple(UNET)


def unet_kwargs(dataset):
    """UNet keyword arguments of a data set's configuration (lib/image_task.py), input shape included."""
    info = INFO[dataset]
    return {"input_channels": info.channels, "input_height": info.height, **UNET[dataset]}


def image_shape(dataset):
    return tuple(INFO[dataset].shape)  # (C, H, W)


def add_machine_args(parser):
    """--device, --threads and --seed, which every speed benchmark takes."""
    parser.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)


def machine(args, parser):
    """Apply --threads and return the torch.device of --device (a one-line error if it is unavailable)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return resolve_device(args.device)
    except ConfigError as err:
        parser.error(str(err))


def describe(device):
    """One line naming the machine: processor or GPU, torch version and CPU threads."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = cpu_model()
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (f"{what}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads "
            f"(OMP_WAIT_POLICY {wait}); device {device}")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Run fn() once; return (wall seconds, CPU seconds of this process)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


class PeakMemory:
    """Peak memory of a block, in bytes above the memory in use when it started.

    CUDA: torch.cuda.max_memory_allocated (tensors only). CPU: the growth of the process's peak
    resident set size (VmHWM, reset at the start through /proc/self/clear_refs), which also counts
    allocator slack; `None` where Linux's /proc is not available.
    """

    def __init__(self, device):
        self.device = device
        self.peak = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.peak = _status_bytes("VmHWM") - self.start
        return False


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} missing from /proc/self/status")


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (writing 5 to clear_refs) and return it; None if unsupported.

    Freed memory is first handed back to the system (glibc's malloc_trim), so memory an earlier
    block freed but the allocator kept does not hide this block's growth.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def mib(n):
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"
