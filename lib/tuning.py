"""Hyper-parameter sweeps (tune.py): search spaces, the trial that runs a training script under Ray Tune, results.

Layout of a sweep folder <saveroot>/<expname> (the sweep's --saveroot and --expname):

    sweep.json          the sweep's settings, so a rerun can tell "resume this sweep" from "another sweep"
    ray_tune/           Ray Tune's experiment state (trials, their reported results, the searcher)
    trial_<id>/         one ordinary run folder per trial: what the training script writes (args.json,
                        log.txt, metrics.jsonl, TensorBoard events, checkpoint.pt, figures) plus
                        output.txt, the script's stdout and stderr
    results.csv         one row per trial (see RESULT_COLUMNS)

A trial is the training script as a child process (`python train_toy.py <flags> --saveroot=<sweep>
--expname=trial_<id>`): `run_trial` starts it, reads each new line of its metrics.jsonl and reports
it to Ray Tune, so a scheduler (ASHA) can stop it early. The training scripts never import Ray.

Nothing at module level imports Ray: tune.py checks its arguments before paying for Ray, and the
tests of the parsing run without it. tune.py pickles this module by value for Ray's workers, so a
worker needs no import path to it, only the training script at the same path (a shared filesystem
on a cluster).
"""
import csv
import ctypes
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

SPACE_KINDS = ("uniform", "loguniform", "choice", "randint")
SPACE_SYNTAX = "uniform:LO:HI, loguniform:LO:HI, choice:A,B,C or randint:LO:HI"
RAY_DIR = "ray_tune"  # Ray Tune's experiment folder inside the sweep folder
OUTPUT_FILE = "output.txt"  # the training script's stdout and stderr, in its run folder
COMPLETED_KEY = "run_completed"  # in the last result of a trial whose script ran to its end (see run_trial)
# Columns of results.csv; each searched flag gets a column of its own after "status".
RESULT_COLUMNS = ("trial", "status", "iterations", "last_{metric}", "best_{metric}", "best_iteration", "error",
                  "run_folder", "command")


class SearchSpaceError(ValueError):
    """A malformed --search; the message is one line."""


@dataclass(frozen=True)
class Space:
    """One --search NAME=SPACE: the script's flag --NAME drawn from a distribution.

    kind: one of SPACE_KINDS; low, high: the bounds (uniform, loguniform: floats; randint: ints, both
    included); options: the strings of a choice, passed to the script as written.
    """

    name: str
    kind: str
    low: float = None
    high: float = None
    options: tuple = ()

    @property
    def text(self):
        if self.kind == "choice":
            return f"{self.name}=choice:{','.join(self.options)}"
        return f"{self.name}={self.kind}:{self.low}:{self.high}"

    def to_ray(self):
        """The Ray Tune domain that samples it."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "randint":
            return tune.randint(self.low, self.high + 1)  # Ray's upper bound is excluded, ours included
        return tune.choice(list(self.options))

    def format(self, value):
        """A sampled value as the script's command line writes it (floats in full precision)."""
        if self.kind in ("uniform", "loguniform"):
            return repr(float(value))  # float(): Ray may hand over a numpy scalar, whose repr names its type
        if self.kind == "randint":
            return str(int(value))
        return str(value)

    def probes(self):
        """Command-line values that stand for the whole space when checking it against the script's parser:
        the bounds and, for a continuous space, a point inside (so an integer flag is caught: 40.0 is not an int)."""
        if self.kind == "choice":
            return list(self.options)
        if self.kind == "randint":
            return [self.format(self.low), self.format(self.high)]
        inside = math.sqrt(self.low * self.high) if self.kind == "loguniform" else (self.low + self.high) / 2
        return [self.format(self.low), self.format(inside), self.format(self.high)]


def parse_space(text):
    """'NAME=SPACE' -> Space, or SearchSpaceError saying what is wrong and what is allowed."""
    name, sep, spec = text.partition("=")
    name = name.strip().lstrip("-")
    if not sep or not name or not spec:
        raise SearchSpaceError(f"--search {text}: expected NAME=SPACE with SPACE one of {SPACE_SYNTAX}")
    kind, _, rest = spec.partition(":")
    if kind not in SPACE_KINDS:
        raise SearchSpaceError(f"--search {text}: unknown space {kind!r}; expected {SPACE_SYNTAX}")
    if kind == "choice":
        options = tuple(o.strip() for o in rest.split(","))
        if not rest or any(o == "" for o in options):
            raise SearchSpaceError(f"--search {text}: expected choice:A,B,C (comma-separated, none empty)")
        return Space(name, kind, options=options)
    parts = rest.split(":")
    if len(parts) != 2:
        raise SearchSpaceError(f"--search {text}: expected {kind}:LO:HI")
    number = int if kind == "randint" else float
    try:
        low, high = (number(p) for p in parts)
    except ValueError:
        what = "integers" if kind == "randint" else "numbers"
        raise SearchSpaceError(f"--search {text}: LO and HI of {kind} must be {what}, got {parts[0]!r} and "
                               f"{parts[1]!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SearchSpaceError(f"--search {text}: LO and HI must be finite")
    if kind == "randint" and low > high:
        raise SearchSpaceError(f"--search {text}: randint needs LO <= HI (both included)")
    if kind != "randint" and not low < high:
        raise SearchSpaceError(f"--search {text}: {kind} needs LO < HI")
    if kind == "loguniform" and low <= 0:
        raise SearchSpaceError(f"--search {text}: loguniform needs 0 < LO < HI")
    return Space(name, kind, low, high)


def flag_names(argv):
    """The flag names in a list of command-line words: ['--lr=1e-3', '--width', '8'] -> {'lr', 'width'}."""
    return {word[2:].split("=", 1)[0] for word in argv if word.startswith("--") and len(word) > 2}


# --- one trial ---------------------------------------------------------------------------------------------

def trial_name(trial_id):
    """The trial's run folder name (and Ray trial name): unique per trial, so a fresh sweep never reuses a folder."""
    return f"trial_{trial_id}"


def trial_args(spec, config, name):
    """The training script's arguments for one trial.

    spec: tune.py's plain dict (see tune.py: trial_spec) with script, cwd, script_flags (the flags passed
    through, in order), seed_flags (['--seed=S'] or []), spaces ({flag: kind}, in --search order), sweep_dir
    and cpu_only;
    config: Ray's sampled values {flag: value}; name: the trial's run folder name.
    The run folder is <sweep_dir>/<name>; --saveroot and --expname come last, so they win.
    """
    spaces = {n: Space(n, k) for n, k in spec["spaces"].items()}
    searched = [f"--{n}={spaces[n].format(config[n])}" for n in spaces]
    return [*spec["script_flags"], *spec["seed_flags"], *searched, f"--saveroot={spec['sweep_dir']}",
            f"--expname={name}"]


def read_records(path):
    """The JSON objects of a metrics.jsonl, in order (a line still being written, or torn by a kill, is skipped)."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
    return records


def last_line(path):
    """The last non-empty line of a text file ('' when there is none): a failed script's one-line error."""
    try:
        with open(path, errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1] if lines else ""


class TrialFailed(RuntimeError):
    """The training script exited with a non-zero status; the message is one line."""


def run_trial(config, spec):
    """Ray Tune's function trainable: run the training script for one trial and report its evaluations.

    The script runs as a child process with cwd = the folder tune.py was started in, its output going to
    <run folder>/output.txt; it sees the GPUs Ray gave the trial (CUDA_VISIBLE_DEVICES), none when spec's
    cpu_only is set (--gpus_per_trial=0). Every `poll_s` seconds the new lines of its metrics.jsonl (those past the last
    reported iteration) go to tune.report, each with all its numbers (iteration, loss, the metric, its standard
    error, ...). The line of the run's last iteration (--num_iterations, from its args.json) is held back until
    the script has exited, so that no decision on it (ASHA at its last rung or at max_t) can cut short the
    script's final checkpoint and figures; when the script exits by itself with status 0, that last report
    also carries COMPLETED_KEY = 1, which tells a completed trial from one stopped early.

    When Ray stops the trial (ASHA), tune.report raises SystemExit in this thread and the child gets SIGTERM,
    on which the scripts write a checkpoint at the end of the iteration and exit (SIGKILL after `grace_s`;
    their checkpoint writes are atomic either way).

    A resumed trial (Ray restarts it after the sweep was killed) runs the same command, so the script resumes
    from its checkpoint.pt; the lines it already has are reported again (Ray keeps both copies, equal values)
    and the script drops lines past its checkpoint, then writes them again with the same values (exact resume).
    """
    from ray import tune

    name = trial_name(tune.get_context().get_trial_id())
    cwd = spec["cwd"]
    run_dir = os.path.join(cwd, spec["sweep_dir"], name)
    os.makedirs(run_dir, exist_ok=True)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    command = [sys.executable, spec["script"], *trial_args(spec, config, name)]
    env = dict(os.environ)
    if spec.get("cpu_only"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # Ray narrows it for trials with GPUs only; --device=auto must not find one
    with open(os.path.join(run_dir, OUTPUT_FILE), "ab") as out:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        reported, completed = 0, False
        while True:
            exited = child.poll() is not None  # before reading, so the lines written before the exit are read
            final = _num_iterations(run_dir)
            records = read_records(metrics_path)
            for record in records:
                held_back = not exited and final is not None and record["iteration"] >= final
                if record["iteration"] > reported and not held_back:
                    completed = exited and child.returncode == 0 and record is records[-1]
                    tune.report(_numbers(record, completed))
                    reported = record["iteration"]
            if exited:
                break
            time.sleep(spec.get("poll_s", 0.5))
        if child.returncode != 0:
            reason = last_line(os.path.join(run_dir, OUTPUT_FILE)) or "no output"
            raise TrialFailed(f"{os.path.basename(spec['script'])} exited with status {child.returncode}: {reason}")
        if records and not completed:  # the script ended without a new line (e.g. rerun on a finished run)
            tune.report(_numbers(records[-1], True))
    finally:
        _stop(child, spec.get("grace_s", 120.0))


def _numbers(record, completed):
    """What goes to tune.report from a metrics.jsonl record: its numbers, and COMPLETED_KEY on the last one."""
    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if completed:
        metrics[COMPLETED_KEY] = 1
    return metrics


def _stop(child, grace_s):
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _die_with_parent():
    """In the child before exec (Linux): SIGTERM it when the thread that started it dies, so a sweep killed
    outright (its Ray worker gone with it) leaves no orphan training run writing into its run folder."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# --- results ------------------------------------------------------------------------------------------------

def trial_row(trial, spec, metric, mode, python="python"):
    """One results.csv row (a dict over result_columns) for a Ray Tune Trial and its run folder.

    Status: 'completed' (the script ran to its end), 'stopped' (stopped early by the scheduler),
    'error' (the script failed: `error` holds its last output line) or 'unfinished' (the sweep was interrupted;
    rerunning the command resumes it). Iterations and the metrics are the run's own (its metrics.jsonl); best
    is the highest (mode max) or lowest (mode min) evaluation.
    """
    name = trial_name(trial.trial_id)
    run_dir = os.path.join(spec["cwd"], spec["sweep_dir"], name)
    records = [r for r in read_records(os.path.join(run_dir, "metrics.jsonl")) if metric in r]
    row = {"trial": name, "run_folder": os.path.join(spec["sweep_dir"], name)}
    row.update({n: Space(n, k).format(trial.config[n]) for n, k in spec["spaces"].items() if n in trial.config})
    row["command"] = shlex.join([python, spec["script"], *trial_args(spec, trial.config, name)])
    if records:
        pick = max if mode == "max" else min
        best = pick(records, key=lambda r: r[metric])
        row.update({"iterations": records[-1]["iteration"], f"last_{metric}": records[-1][metric],
                    f"best_{metric}": best[metric], "best_iteration": best["iteration"]})
    if trial.status == "ERROR":
        row["status"] = "error"
        row["error"] = last_line(os.path.join(run_dir, OUTPUT_FILE)) or f"see {trial.path}/error.txt"
    elif trial.last_result.get(COMPLETED_KEY):
        row["status"] = "completed"
    elif trial.status == "TERMINATED":
        row["status"] = "stopped"
    else:
        row["status"] = "unfinished"
    return row


def result_columns(spec, metric):
    head, tail = RESULT_COLUMNS[:2], RESULT_COLUMNS[2:]
    return [*head, *spec["spaces"], *(c.format(metric=metric) for c in tail)]


def sort_rows(rows, metric, mode):
    """Best first: trials with a metric by their best value, then the rest by name."""
    key = f"best_{metric}"
    sign = -1 if mode == "max" else 1
    return sorted(rows, key=lambda r: (key not in r, sign * r[key] if key in r else 0, r["trial"]))


def write_results(path, rows, columns):
    """results.csv, written atomically (a temporary file renamed over it)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def summary(rows, columns):
    """The table printed at the end (the command column left out: the best trial's is printed in full)."""
    shown = [c for c in columns if c not in ("command", "run_folder", "error")]
    table = [shown] + [[_cell(r.get(c, "")) for c in shown] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(shown))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['trial']}: {r['error']}")
    return "\n".join(lines)


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _num_iterations(run_dir):
    try:
        with open(os.path.join(run_dir, "args.json")) as fh:
            return json.load(fh)["num_iterations"]
    except (OSError, ValueError, KeyError):
        return None
