"""tune.py (issue 17), end to end and in parts:

  * a 2-trial sweep of the toy on an embedded Ray with ASHA: results.csv against each trial's own
    metrics.jsonl and args.json, and against what Ray Tune was told; the poor trial stopped early and its
    training process gone; each trial an ordinary run folder; the printed command the best trial's;
  * a sweep SIGKILLed and rerun, on a running Ray cluster joined with --address: the killed sweep's training
    process does not outlive it, the finished trial is not started again, the unfinished one resumes from
    its checkpoint;
  * the trial's child process under a stand-in for Ray: each evaluation reported once, the last one after
    the script ended, SIGTERM when Ray stops the trial, GPUs hidden with --gpus_per_trial=0, a failure in
    one line;
  * the one-line refusals (exit status 2) of bad spaces and flags, before Ray starts.

Ray costs seconds to start on 2 cores, so the sweeps are a few hundred iterations of a 16-unit MLP, and
the kill test's two runs join one `ray start --head` cluster. Ray stays on the loopback interface
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), keeps its session files in a short folder under /tmp (unix socket
paths are limited to 107 bytes), authenticates with a token from the environment (nothing written to
~/.ray), and the sweeps write into the tests' tmp folders.
"""
import csv
import glob
import json
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import tune
from lib import tuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--width=16", "--depth=1", "--print_every=100", "--checkpoint_every=100", "--num_eval=200", "--elbo_repeats=2",
       "--num_steps=10", "--batch_size=128", "--lmbd=0,1", "--warmup=20", "--device=cpu"]
SCRIPT_FLAGS = ["--", "--num_samples=50"]  # the script's own --num_samples (points in its figures), after --


@pytest.fixture(scope="module")
def ray_env():
    """Environment for tune.py and `ray start`: a short temp dir, loopback only, a token from the environment."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", RAY_TMPDIR=temp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_TOKEN=secrets.token_hex(16), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    yield env
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_env, tmp_path_factory):
    """A one-node Ray cluster (`ray start --head --block`) in its own process group; -> its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("cluster") / "ray_start.txt"
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    with open(log, "w") as out:
        head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                                 "--include-dashboard=false", f"--temp-dir={ray_env['RAY_TMPDIR']}",
                                 "--disable-usage-stats"], env=ray_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_group(head)


def _stop_group(head):
    """Stop `ray start --block` and its process group (ours alone: it was started in a session of its own)."""
    head.terminate()  # it shuts its processes down in order; a SIGTERM to all at once leaves it waiting on a dead GCS
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # whatever is left of the group
    except ProcessLookupError:
        pass
    head.wait()


def tune_command(root, expname, num_iterations, *extra):
    return [sys.executable, os.path.join(REPO, "tune.py"), os.path.join(REPO, "train_toy.py"), f"--saveroot={root}",
            f"--expname={expname}", f"--num_iterations={num_iterations}", *TOY, *extra, *SCRIPT_FLAGS]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def results(sweep_dir):
    with open(os.path.join(sweep_dir, "results.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def ray_reports(sweep_dir, trial):
    """{iteration: elbo} of what the trial reported to Ray Tune (Ray's own result.json of the trial)."""
    with open(os.path.join(sweep_dir, tuning.RAY_DIR, trial, "result.json")) as fh:
        return {r["iteration"]: r["elbo"] for r in map(json.loads, fh) if "iteration" in r}


def training_processes(run_folder):
    """PIDs of training processes writing into run_folder (their command line names it)."""
    name = os.path.basename(run_folder)
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                words = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if f"--expname={name}" in words and any(w.endswith("train_toy.py") for w in words):
            pids.append(int(pid))
    return pids


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- a sweep on an embedded Ray, with ASHA ------------------------------------------------------------------

# Seed 6 draws (lr, width, ema_decay) = (3e-3, 12, 0.931) for the first trial and (1e-6, 11, 0.934) for the
# second (Ray 2.60's BasicVariantGenerator). Run one at a time, the second trains with a learning rate too
# small to move, so ASHA stops it at its first rung (iteration 50), well below the first trial's ELBO there.
SWEEP_SEED = 6


@pytest.fixture(scope="module")
def sweep(ray_env, tmp_path_factory):
    """tune.py run from a folder of its own with a relative --saveroot -> (that folder, tune.py's stdout)."""
    root = tmp_path_factory.mktemp("sweep")
    command = tune_command("sweeps", "toy", 200, "--num_samples=2", "--max_concurrent=1", "--scheduler=asha",
                           f"--seed={SWEEP_SEED}", "--print_every=50", "--search", "lr=choice:3e-3,1e-6",
                           "--search", "width=randint:8:16", "--search", "ema_decay=uniform:0.9:0.99")
    command.remove("--width=16")  # searched instead
    command.remove("--print_every=100")
    done = subprocess.run(command, cwd=str(root), env=ray_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, done.stdout


def test_results_csv_matches_each_trials_own_metrics_and_ray_saw_its_evaluations(sweep):
    root, _ = sweep
    sweep_dir = os.path.join(root, "sweeps", "toy")
    rows = results(sweep_dir)
    assert [(r["lr"], r["width"]) for r in rows] == [("3e-3", "12"), ("1e-6", "11")], \
        f"the draws of --seed={SWEEP_SEED} changed: pick a seed whose first trial has lr 3e-3 and second 1e-6"
    assert list(rows[0])[:5] == ["trial", "status", "lr", "width", "ema_decay"]
    for row in rows:
        assert row["run_folder"] == os.path.join("sweeps", "toy", row["trial"])  # as given: relative to the cwd
        run_dir = os.path.join(root, row["run_folder"])
        recs = records(run_dir)
        best = max(recs, key=lambda r: r["elbo"])
        assert int(row["iterations"]) == recs[-1]["iteration"]
        assert float(row["last_elbo"]) == recs[-1]["elbo"]  # csv keeps repr(float): exact
        assert float(row["best_elbo"]) == best["elbo"] and int(row["best_iteration"]) == best["iteration"]
        assert row["error"] == ""
        # The flags in the row are the ones the trial ran with; the sweep's --seed is every trial's seed.
        with open(os.path.join(run_dir, "args.json")) as fh:
            args = json.load(fh)
        assert float(row["lr"]) == args["lr"] and int(row["width"]) == args["width"]
        assert float(row["ema_decay"]) == args["ema_decay"] and 0.9 <= args["ema_decay"] <= 0.99
        assert args["seed"] == SWEEP_SEED and args["num_samples"] == 50 and args["num_iterations"] == 200
        # Ray Tune was told each evaluation, with the value the run logged (a stopped run may have logged one
        # more before it was terminated).
        told = ray_reports(sweep_dir, row["trial"])
        assert told == {r["iteration"]: r["elbo"] for r in recs if r["iteration"] in told}
        assert not training_processes(run_dir)
    done, stopped = rows
    assert done["status"] == "completed" and [r["iteration"] for r in records(os.path.join(root, done["run_folder"]))] \
        == [1, 50, 100, 150, 200]
    stopped_dir = os.path.join(root, stopped["run_folder"])
    assert stopped["status"] == "stopped" and 50 <= int(stopped["iterations"]) < 200
    assert 50 in ray_reports(sweep_dir, stopped["trial"]) and "ODE" not in _read(os.path.join(stopped_dir, "log.txt"))
    assert float(done["best_elbo"]) > float(stopped["best_elbo"])  # best first (ELBO: higher is better)


def test_each_trial_is_an_ordinary_run_and_the_printed_command_is_the_best_trials(sweep):
    import train_toy
    from lib.checkpoint import load_checkpoint, load_model

    root, stdout = sweep
    best = results(os.path.join(root, "sweeps", "toy"))[0]
    run_dir = os.path.join(root, best["run_folder"])
    for name in ("args.json", "log.txt", "checkpoint.pt", "samples.png", tuning.OUTPUT_FILE):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["iteration"] == 200  # its final checkpoint
    assert load_model(os.path.join(run_dir, "checkpoint.pt")) is not None  # what evaluate.py and sample.py load
    # The summary names the best trial and prints its full command; run from the sweep's folder, that command
    # parses to exactly the arguments of the trial's run folder (so rerunning it resumes or repeats that run).
    assert f"Best trial {best['trial']}" in stdout
    printed = stdout.split(f"Best trial {best['trial']}", 1)[1].splitlines()[1].strip()
    assert printed == best["command"]
    words = shlex.split(printed)
    assert words[1].endswith("train_toy.py")
    with open(os.path.join(run_dir, "args.json")) as fh:
        assert vars(train_toy.parse_args(words[2:])) == json.load(fh)


# --- killing and resuming a sweep on a running cluster ------------------------------------------------------

def test_a_killed_sweep_resumes_unfinished_trials_from_their_checkpoints_and_keeps_finished_ones(
        ray_env, cluster, tmp_path):
    """Trials run one at a time; tune.py is SIGKILLed once the first trial has finished and the second has
    written a checkpoint. The second trial's training process goes down with the sweep; rerunning the same
    command leaves the first trial alone and resumes the second from its checkpoint."""
    command = tune_command(tmp_path, "toy", 400, "--num_samples=2", "--search", "lr=loguniform:1e-3:1e-2",
                           "--max_concurrent=1", f"--address={cluster}")
    sweep_dir = os.path.join(tmp_path, "toy")
    with open(tmp_path / "first.txt", "w") as out:
        first = subprocess.Popen(command, cwd=str(tmp_path), env=ray_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def trial_folders():  # trial_<experiment>_00000, _00001: the order they run in, one at a time
            return sorted(glob.glob(os.path.join(sweep_dir, "trial_*")))

        def finished(run_dir):
            return "ODE" in _read(os.path.join(run_dir, "log.txt")) and not training_processes(run_dir)

        # The first trial ran to its end; the second is under way with a checkpoint written.
        wait_for(lambda: len(trial_folders()) == 2 and finished(trial_folders()[0])
                 and os.path.exists(os.path.join(trial_folders()[1], "checkpoint.pt")), 300,
                 "the second trial's first checkpoint\n" + _read(tmp_path / "first.txt")[-3000:])
        done_dir, killed_dir = trial_folders()
        first.kill()
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    # The killed sweep's training process does not outlive it (it would write into the run folder the resumed
    # trial writes into).
    wait_for(lambda: not training_processes(killed_dir), 30, "the killed sweep's training process to exit")
    assert "Iteration 400" not in _read(os.path.join(killed_dir, "log.txt")), "killed too late: the trial had finished"
    done_log = _read(os.path.join(done_dir, "log.txt"))

    second = subprocess.run(command, cwd=str(tmp_path), env=ray_env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Resuming the sweep" in second.stdout
    assert _read(os.path.join(done_dir, "log.txt")) == done_log  # not started again
    killed_log = _read(os.path.join(killed_dir, "log.txt"))
    assert killed_log.count("Resuming from") == 1 and "Iteration 400" in killed_log
    rows = {r["trial"]: r for r in results(sweep_dir)}
    assert sorted(rows) == sorted(os.path.basename(d) for d in (done_dir, killed_dir))
    for run_dir in (done_dir, killed_dir):
        row, recs = rows[os.path.basename(run_dir)], records(run_dir)
        assert row["status"] == "completed" and int(row["iterations"]) == recs[-1]["iteration"] == 400
        assert float(row["last_elbo"]) == recs[-1]["elbo"]
        assert [r["iteration"] for r in recs] == [1, 100, 200, 300, 400]  # no duplicates after the resume
    assert not training_processes(killed_dir) and not training_processes(done_dir)


def _read(path):
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


# --- the trial's child process, under a stand-in for Ray ----------------------------------------------------

FAKE_SCRIPT = """
import json, os, signal, sys, time
run = os.path.join(sys.argv[-2].split("=", 1)[1], sys.argv[-1].split("=", 1)[1])
os.makedirs(run, exist_ok=True)
with open(os.path.join(run, "pid"), "w") as fh:
    fh.write(str(os.getpid()))
with open(os.path.join(run, "args.json"), "w") as fh:
    json.dump({"num_iterations": 20}, fh)
with open(os.path.join(run, "cuda.txt"), "w") as fh:
    fh.write(repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
with open(os.path.join(run, "metrics.jsonl"), "a") as fh:
    for it in (1, 10, 20):
        record = {"iteration": it, "loss": 1.0 / it, "elbo": -1.0 / it, "wall_time": 0.5, "note": "x"}
        fh.write(json.dumps(record) + "\\n")
        fh.flush()
    fh.write('{"iteration": 30, "elb')  # a line still being written
    fh.flush()
def terminated(signum, frame):
    open(os.path.join(run, "terminated"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, terminated)
if "--fail" in sys.argv:
    print("fake.py: error: something specific went wrong", file=sys.stderr)
    sys.exit(1)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""


class _StopTrial(SystemExit):
    """What Ray's tune.report raises in the trial's thread when the scheduler stops the trial."""


@pytest.fixture
def fake_ray(monkeypatch, tmp_path):
    """lib.tuning.run_trial with ray.tune's report and get_context replaced: -> (run, reports)."""
    ray_tune = pytest.importorskip("ray.tune")
    reports, stop_after = [], {"n": None}

    class Context:
        def get_trial_id(self):
            return "abc_00000"

    def report(metrics):
        pid = int((tmp_path / "sweep" / "trial_abc_00000" / "pid").read_text())
        reports.append({**metrics, "child_running": os.path.exists(f"/proc/{pid}")})
        if stop_after["n"] is not None and len(reports) >= stop_after["n"]:
            raise _StopTrial(0)

    monkeypatch.setattr(ray_tune, "report", report)
    monkeypatch.setattr(ray_tune, "get_context", lambda: Context())
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SCRIPT)

    def run(flags=(), stop=None, sleep=0.0, cpu_only=True):
        stop_after["n"] = stop
        monkeypatch.setenv("FAKE_SLEEP", str(sleep))
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # as Ray sets it for a trial with two GPUs
        spec = {"script": str(script), "cwd": str(tmp_path), "script_flags": list(flags), "seed_flags": [],
                "spaces": {"lr": "loguniform"}, "sweep_dir": "sweep", "poll_s": 0.05, "cpu_only": cpu_only}
        tuning.run_trial({"lr": 0.5}, spec)

    return run, reports, tmp_path / "sweep" / "trial_abc_00000"


def test_each_complete_metrics_line_is_reported_once_and_the_last_after_the_script_ended(fake_ray):
    run, reports, run_dir = fake_ray
    run(sleep=0.5)  # several polls after the lines were written
    assert [r["iteration"] for r in reports] == [1, 10, 20]  # once each; the torn line is not reported
    assert reports[1] == {"iteration": 10, "loss": 0.1, "elbo": -0.1, "wall_time": 0.5,  # numbers only
                          "child_running": True}
    # The line of the last iteration (args.json's num_iterations) waits for the script's end, so no scheduler
    # decision on it cuts the script's final checkpoint short; it marks the trial as run to its end.
    assert reports[2] == {"iteration": 20, "loss": 0.05, "elbo": -0.05, "wall_time": 0.5, "child_running": False,
                          tuning.COMPLETED_KEY: 1}


def test_a_trial_stopped_by_the_scheduler_terminates_its_training_process(fake_ray):
    run, reports, run_dir = fake_ray
    started = time.time()
    with pytest.raises(_StopTrial):
        run(stop=1, sleep=60)
    assert time.time() - started < 10
    assert (run_dir / "terminated").exists()  # by SIGTERM, which the scripts die of at once (no SIGKILL needed)
    pid = int((run_dir / "pid").read_text())
    assert not os.path.exists(f"/proc/{pid}")  # and reaped


def test_a_trial_sees_the_gpus_ray_gave_it_and_none_with_gpus_per_trial_0(fake_ray):
    run, reports, run_dir = fake_ray
    run(cpu_only=False)
    assert (run_dir / "cuda.txt").read_text() == "'0,1'"
    run(cpu_only=True)
    assert (run_dir / "cuda.txt").read_text() == "''"


def test_a_failing_script_fails_the_trial_with_its_last_line(fake_ray):
    run, reports, run_dir = fake_ray
    with pytest.raises(tuning.TrialFailed, match=r"^fake.py exited with status 1: fake.py: error: something specific"):
        run(flags=["--fail"])
    assert [r["iteration"] for r in reports] == [1, 10, 20]  # what it reported before failing still counts
    assert not any(tuning.COMPLETED_KEY in r for r in reports)


# --- refusals: one line, exit status 2, nothing started ------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--search", "lr=uniform:1"], "--search lr=uniform:1: expected uniform:LO:HI"),
    (["--search", "lr=normal:0:1"], "unknown space 'normal'"),
    (["--search", "lr"], "expected NAME=SPACE"),
    (["--search", "lr=loguniform:0:1e-2"], "loguniform needs 0 < LO < HI"),
    (["--search", "lr=uniform:2e-3:1e-3"], "uniform needs LO < HI"),
    (["--search", "width=randint:8:x"], "LO and HI of randint must be integers"),
    (["--search", "lr=choice:1e-3,,2e-3"], "expected choice:A,B,C"),
    (["--search", "width=uniform:16:64"], "--width=16.0: train_toy.py refuses it: argument --width: expected an int"),
    (["--search", "lr=choice:1e-3,fast"], "--lr=fast: train_toy.py refuses it: argument --lr: expected a number"),
    (["--search", "nosuch=choice:1,2"], "train_toy.py has no flag --nosuch=1"),
    (["--nosuch=3"], "train_toy.py has no flag --nosuch=3"),
    (["--width=0"], "train_toy.py refuses it: argument --width: must be a positive integer"),
    (["--search", "lr=choice:1e-3", "--search", "lr=choice:1e-2"], "--search lr is given 2 times"),
    (["--lr=1e-3", "--search", "lr=choice:1e-2"], "--lr is both searched and given"),
    (["--search", "saveroot=choice:a,b"], "tune.py sets --saveroot of each trial"),
    (["--", "--expname=x"], "--expname after --"),
    (["--scheduler=hyperband"], "argument --scheduler: invalid choice"),
    (["--num_samples=0"], "argument --num_samples: must be a positive integer"),
    (["--metric=elbo"], "--metric=elbo: expected NAME:max or NAME:min"),
])
def test_bad_spaces_and_flags_are_refused_with_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tune, "sweep", lambda *args: pytest.fail("a refused sweep went on to start Ray"))
    with pytest.raises(SystemExit) as exit_:
        sys.exit(tune.main([os.path.join(REPO, "train_toy.py"), f"--saveroot={tmp_path}", *argv]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tune.py: error: ") and message in err, err
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_a_missing_script_and_a_changed_sweep_are_refused_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tune, "sweep", lambda *args: pytest.fail("a refused sweep went on to start Ray"))
    assert tune.main([str(tmp_path / "nothere.py")]) == 2
    assert capsys.readouterr().err == f"tune.py: error: {tmp_path / 'nothere.py'}: no such training script\n"
    # A rerun with other settings would be resumed by Ray with the old ones: refused. (Ray itself is not started.)
    monkeypatch.setattr(tune, "sweep", lambda args, spec, *rest: tune.record_sweep(spec["sweep_dir"], rest[-1]) or 0)
    argv = [os.path.join(REPO, "train_toy.py"), f"--saveroot={tmp_path}", "--expname=toy", "--search=lr=choice:1e-3"]
    assert tune.main([*argv, "--num_samples=4"]) == 0
    assert tune.main([*argv, "--num_samples=4", "--address=auto"]) == 0  # another address is the same sweep
    assert tune.main([*argv, "--num_samples=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a sweep started with other settings (num_samples: 4 then, 8 now)" in err


def test_search_spaces_parse_to_ray_domains_and_format_for_the_command_line():
    lr = tuning.parse_space("lr=loguniform:1e-4:1e-2")
    assert (lr.kind, lr.low, lr.high) == ("loguniform", 1e-4, 1e-2)
    assert lr.format(__import__("numpy").float64(0.00123)) == "0.00123"  # not 'np.float64(0.00123)'
    assert lr.probes() == ["0.0001", repr(math.sqrt(1e-6)), "0.01"]
    width = tuning.parse_space("width=randint:8:16")
    assert width.probes() == ["8", "16"] and width.format(12.0) == "12"
    batch = tuning.parse_space("--batch_size=choice:256,512")
    assert (batch.name, batch.options) == ("batch_size", ("256", "512"))
    pytest.importorskip("ray.tune")
    assert width.to_ray().upper == 17  # Ray's randint excludes its upper bound; ours includes it
    assert batch.to_ray().categories == ["256", "512"]
