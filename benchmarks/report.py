"""Every benchmark's figures as JSON beside what it prints: one record per run, written by `write_json`.

    {"benchmark": "throughput", "command": "python benchmarks/throughput.py ...", "commit": "08558b1",
     "dirty": false, "date": "2026-12-02T10:00:00+00:00",
     "machine": {"platform", "python", "cpu", "cpu_count", "torch", "threads", "omp_wait_policy", "device",
                 "gpu"},
     "arguments": {the parsed flags, defaults included}, "figures": {what the benchmark prints}}

It goes to the path of the benchmark's --json flag (`add_json_arg`), by default benchmarks/results/<name>.json
(the folder is made on demand), written to a temporary file beside it and renamed into place, so a reader
never sees half a record. "commit" is `git rev-parse --short HEAD` ("unknown" outside a git checkout) and
"dirty" says whether tracked files differed from it (None when unknown). Non-finite floats are written as
the strings "NaN", "Infinity" and "-Infinity", so the file is strict JSON.

Only the standard library and torch: no lib/ import, so every benchmark can use it.
"""
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def add_json_arg(parser, name):
    """--json PATH, where write_json puts the record (default benchmarks/results/<name>.json)."""
    parser.add_argument("--json", default=None, metavar="PATH",
                        help=f"where the figures are written as JSON (default: benchmarks/results/{name}.json)")


def command_line():
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def cpu_model():
    """The processor's name and core count, e.g. 'Intel(R) Xeon(R) ... (2 cores)'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def git_state():
    """(short commit of HEAD or "unknown", whether tracked files differ from it or None if unknown)."""
    def git(*args):
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return commit, dirty


def machine_info(device=None):
    """The machine a run measured: platform, processor, torch version and threads, device (and GPU name)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "device": str(device), "gpu": None}
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _plain(value):
    """value with tensors, tuples and numpy-like scalars made JSON types, non-finite floats strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, torch.device):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def write_json(name, figures, args=None, device=None):
    """Write the run's record (module docstring) to args.json or benchmarks/results/<name>.json; return the path.

    args: the parsed arguments (their --json picks the path; all are recorded under "arguments").
    """
    path = getattr(args, "json", None) or os.path.join(RESULTS, f"{name}.json")
    commit, dirty = git_state()
    record = {
        "benchmark": name,
        "command": command_line(),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "arguments": _plain(vars(args)) if args is not None else {},
        "figures": _plain(figures),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would otherwise stick to the result
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    shown = os.path.relpath(path)
    print(f"figures written to {path if shown.startswith('..') else shown}")
    return path
