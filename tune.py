"""Search a training script's flags with Ray Tune for the best held-out likelihood (bits/dim or ELBO).

    python tune.py train_toy.py --num_samples=8 --search lr=loguniform:1e-4:1e-2 \\
        --search batch_size=choice:256,512 --num_iterations=4000 --expname=toy_lr
    python tune.py train_img.py --num_samples=16 --search lr=loguniform:3e-5:1e-3 \\
        --search ch=choice:32,64 --scheduler=asha --gpus_per_trial=1 --address=auto --dataset=mnist

Every flag that is not tune.py's own goes to the script unchanged; after `--` every flag does, even
one that tune.py also has (e.g. the script's own --num_samples or --seed). Each trial is an ordinary
run of the script in <saveroot>/<expname>/trial_<id> (log, metrics, TensorBoard, checkpoint: resumable,
and readable by evaluate.py and sample.py); its evaluations are reported to Ray Tune as the trial's
metric (train_img.py: bpd, lower is better; train_toy.py: elbo, higher is better), so ASHA can stop poor
trials early. At the end: <saveroot>/<expname>/results.csv, a table, and the best trial's command line.

Ray runs embedded on this machine unless --address joins a running cluster. Rerunning the same command
resumes a killed sweep: finished trials are kept, the others resume from their checkpoints.
"""
import json
import logging
import os
import sys

from lib.config import ArgumentParser, HelpFormatter, positive_float, positive_int, seed_value
from lib import tuning

# The metric each training script reports in metrics.jsonl, and which way is better.
METRICS = {"train_toy": "elbo:max", "train_img": "bpd:min"}
# Flags of a sweep that may differ when it is resumed (joining the cluster at another address changes nothing).
RESUMABLE = {"address"}


def build_parser():
    p = ArgumentParser(prog="tune.py", description=__doc__.splitlines()[0], allow_abbrev=False,
                       formatter_class=HelpFormatter,
                       epilog="Every other flag goes to the training script unchanged (write them as --flag=value); "
                              "after --, every flag does.")
    p.add_argument("script", help="the training script, e.g. train_toy.py or train_img.py")
    p.add_argument("--num_samples", type=positive_int, default=8, help="trials: draws from the search spaces")
    p.add_argument("--search", action="append", default=None, metavar="NAME=SPACE",
                   help=f"a script flag and its space: {tuning.SPACE_SYNTAX} (randint includes HI); repeatable")
    p.add_argument("--scheduler", choices=("none", "asha"), default="none",
                   help="none: every trial runs to its end; asha: stop poor trials at rungs of --print_every x 4^k "
                        "iterations")
    p.add_argument("--max_concurrent", type=positive_int, default=None,
                   help="trials running at once (default: as many as the CPUs and GPUs allow)")
    p.add_argument("--cpus_per_trial", type=positive_float, default=1.0, help="CPUs Ray reserves for each trial")
    p.add_argument("--gpus_per_trial", type=_nonnegative_float, default=0.0,
                   help="GPUs Ray reserves for each trial (the script sees only those; 0: CPU only)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (auto: the one started on this machine with `ray start`); "
                        "default: an embedded Ray on this machine")
    p.add_argument("--saveroot", default="runs", help="the sweep folder is <saveroot>/<expname>")
    p.add_argument("--expname", default=None, help="the sweep folder's name (default: <the script's expname>_sweep)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seeds the draws from the search spaces and is every trial's --seed (unless searched "
                        "or given after --)")
    known = ", ".join(f"{k}.py {v}" for k, v in METRICS.items())
    p.add_argument("--metric", default=None, metavar="NAME:max|min",
                   help=f"the metrics.jsonl key to optimise and which way (default: {known})")
    return p


def _nonnegative_float(value):
    return 0.0 if value in ("0", "0.0") else positive_float(value)


def parse_args(argv):
    """-> (tune.py's arguments, the script's flags in order). The script's flags are those tune.py does not
    know plus everything after `--`."""
    argv = list(argv)
    after = []
    if "--" in argv:
        cut = argv.index("--")
        argv, after = argv[:cut], argv[cut + 1:]
    args, unknown = build_parser().parse_known_args(argv)
    return args, unknown + after


class SweepError(Exception):
    """A problem with the sweep's arguments or folder; the message is one line (exit status 2)."""


def check(args, script_flags):
    """Validate everything before Ray starts: the script, the spaces, and every flag against the script's own
    parser (each space through values standing for it: its bounds and a point inside).

    Returns (spaces, the script's parsed defaults namespace, metric, mode). Raises SweepError.
    """
    if not os.path.isfile(args.script):
        raise SweepError(f"{args.script}: no such training script")
    try:
        spaces = [tuning.parse_space(text) for text in args.search or []]
    except tuning.SearchSpaceError as err:
        raise SweepError(str(err)) from None
    names = [s.name for s in spaces]
    given = tuning.flag_names(script_flags)
    for s in spaces:
        if names.count(s.name) > 1:
            raise SweepError(f"--search {s.name} is given {names.count(s.name)} times; search each flag once")
        if s.name in ("saveroot", "expname"):
            raise SweepError(f"--search {s.text}: tune.py sets --{s.name} of each trial; it cannot be searched")
        if s.name in given:
            raise SweepError(f"--{s.name} is both searched and given; drop one")
    for name in ("saveroot", "expname"):
        if name in given:
            raise SweepError(f"--{name} after -- : tune.py sets each trial's --{name} (its run folder "
                             f"<saveroot>/<expname>/trial_<id>); give --{name} before --, for the sweep folder")

    script = os.path.basename(args.script)
    metric = args.metric or METRICS.get(os.path.splitext(script)[0])
    if metric is None:
        raise SweepError(f"no metric known for {script}: give --metric=NAME:max or --metric=NAME:min (a key of "
                         "its metrics.jsonl)")
    name, _, mode = metric.partition(":")
    if not name or mode not in ("max", "min"):
        raise SweepError(f"--metric={metric}: expected NAME:max or NAME:min")

    parse = _script_parser(args.script)
    defaults = _parse_script(parse, script_flags, script, "")
    for s in spaces:
        for value in s.probes():
            context = f"--search {s.text}: --{s.name}={value}: "
            _parse_script(parse, [*script_flags, f"--{s.name}={value}"], script, context)
    return spaces, defaults, name, mode


def _script_parser(path):
    """The script's own parse_args(argv), imported from its file (the scripts import their heavy parts in main)."""
    import importlib.util

    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the script's own imports (lib/...) resolve as when it runs
    module_name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "parse_args", None)):
        raise SweepError(f"{path} has no parse_args(argv) to check the flags against")
    return module.parse_args


def _parse_script(parse, argv, script, context):
    """parse(argv), its refusal turned into SweepError naming the script (argparse prints and exits 2)."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(argv)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help or alike among the script's flags
            raise SweepError(f"{context}{script} printed its help instead of parsing; leave --help out") from None
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"status {exit_.code}"
        message = message.split(": error: ", 1)[-1]
        if message.startswith("unrecognized arguments: "):
            flags = message[len("unrecognized arguments: "):]
            message = f"{script} has no flag {flags} (tune.py passes every flag it does not know to the script)"
        else:
            message = f"{script} refuses it: {message}"
        raise SweepError(f"{context}{message}") from None


def trial_spec(args, script_flags, spaces, sweep_dir):
    """The plain dict every trial runs from (see lib.tuning.trial_args; pickled into Ray's experiment state)."""
    seed_flags = [] if "seed" in tuning.flag_names(script_flags) or any(s.name == "seed" for s in spaces) \
        else [f"--seed={args.seed}"]
    return {"script": args.script, "cwd": os.getcwd(), "script_flags": list(script_flags), "seed_flags": seed_flags,
            "spaces": {s.name: s.kind for s in spaces}, "sweep_dir": sweep_dir, "cpu_only": args.gpus_per_trial == 0}


def check_same_sweep(sweep_dir, settings):
    """A sweep that started trials left sweep.json (see `sweep`); a rerun must match it (except RESUMABLE flags),
    since Ray resumes the trials it has with their old flags and would silently ignore new ones."""
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.exists(path):
        return
    with open(path) as fh:
        before = json.load(fh)
    for key in sorted(set(before) | set(settings)):
        if key not in RESUMABLE and before.get(key) != settings.get(key):
            raise SweepError(f"{sweep_dir} holds a sweep started with other settings ({key}: {before.get(key)} "
                             f"then, {settings.get(key)} now); rerun it as it was started to resume it, or pick "
                             "another --expname")


def record_sweep(sweep_dir, settings):
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as fh:
        json.dump(settings, fh, indent=2)


def main(argv=None):
    args, script_flags = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spaces, defaults, metric, mode = check(args, script_flags)
        args.expname = args.expname or f"{defaults.expname}_sweep"
        sweep_dir = os.path.join(args.saveroot, args.expname)
        spec = trial_spec(args, script_flags, spaces, sweep_dir)
        settings = {k: v for k, v in vars(args).items() if k not in ("saveroot", "expname")}
        settings.update(metric=f"{metric}:{mode}", script_flags=script_flags)
        check_same_sweep(sweep_dir, settings)
    except (SweepError, OSError) as err:
        print(f"tune.py: error: {err}", file=sys.stderr)
        return 2
    return sweep(args, spec, spaces, defaults, metric, mode, settings)


def sweep(args, spec, spaces, defaults, metric, mode, settings):
    """Start or join Ray, run (or resume) the trials, write results.csv and print the summary. -> exit status.

    A new sweep writes sweep.json (the settings) just before its trials start, so a rerun can be checked against
    it; Ray's own state goes to <sweep>/ray_tune (resumed with Tuner.restore when there).
    """
    sweep_dir = spec["sweep_dir"]
    if args.address is None:
        # An embedded Ray serves this machine only: keep it on the loopback interface (Ray otherwise listens on
        # the machine's network address), and send no usage statistics from it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    elif "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get(
            "RAY_AUTH_TOKEN_PATH") or os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
        # Ray 2.60's `ray start` turns token authentication on by default, but a driver joining the cluster
        # sends its token only when told to: do so whenever a token is at hand.
        os.environ["RAY_AUTH_MODE"] = "token"
    # Save Ray's experiment state every 2 s (default: every 10 s or more), so a sweep killed right after a
    # trial finished does not start that trial again when resumed.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    import ray
    import ray.cloudpickle
    from ray import tune

    ray.cloudpickle.register_pickle_by_value(tuning)  # Ray's workers get lib.tuning with the trainable
    try:
        if args.address is None:
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=args.address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        print(f"tune.py: error: cannot start or join Ray at --address={args.address}: {str(err).splitlines()[0]} "
              "(start the cluster first: `ray start --head` on one machine)", file=sys.stderr)
        return 1
    try:
        total = ray.cluster_resources()
        for what, need in (("CPU", args.cpus_per_trial), ("GPU", args.gpus_per_trial)):
            if need > total.get(what, 0):
                print(f"tune.py: error: --{what.lower()}s_per_trial={need:g} but the Ray cluster has "
                      f"{total.get(what, 0):g} {what}s", file=sys.stderr)
                return 2

        def trainable(config):
            return tuning.run_trial(config, spec)

        trainable = tune.with_resources(trainable, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
        storage = os.path.abspath(sweep_dir)
        exp_dir = os.path.join(storage, tuning.RAY_DIR)
        if tune.Tuner.can_restore(exp_dir):
            print(f"Resuming the sweep in {sweep_dir}", flush=True)
            # Errored trials resume too: a trial killed from outside (out of memory, a lost node) continues from
            # its checkpoint; one that fails by itself fails again at once.
            tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
        else:
            record_sweep(sweep_dir, settings)
            tuner = tune.Tuner(
                trainable,
                param_space={s.name: s.to_ray() for s in spaces},
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode, num_samples=args.num_samples,
                    scheduler=_scheduler(args, defaults, spaces),
                    # max_concurrent here, not as TuneConfig's max_concurrent_trials, which Ray ignores beside a
                    # search_alg of our own
                    search_alg=tune.search.BasicVariantGenerator(random_state=args.seed,
                                                                 max_concurrent=args.max_concurrent or 0),
                    trial_name_creator=lambda trial: tuning.trial_name(trial.trial_id),
                    trial_dirname_creator=lambda trial: tuning.trial_name(trial.trial_id)),
                run_config=tune.RunConfig(name=tuning.RAY_DIR, storage_path=storage, verbose=1))
        tuner.fit()
        # Ray warns about trials without reported results (never started); the table below shows them.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        trials = tune.ExperimentAnalysis(exp_dir).trials
    finally:
        ray.shutdown()
    return report(trials, spec, metric, mode)


def _scheduler(args, defaults, spaces):
    """ASHA over training iterations: rungs at --print_every x 4^k (the evaluations), up to --num_iterations
    (the largest a trial may run, when it is searched)."""
    if args.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    def bound(flag, pick):
        space = next((s for s in spaces if s.name == flag), None)
        return getattr(defaults, flag) if space is None else pick(int(float(v)) for v in space.probes())

    max_t = bound("num_iterations", max)
    grace = min(bound("print_every", min), max_t)
    return ASHAScheduler(time_attr="iteration", max_t=max_t, grace_period=grace, reduction_factor=4)


def report(trials, spec, metric, mode):
    """Write results.csv and print the table and the best trial's command. -> exit status (1 if any trial failed
    or is unfinished)."""
    python = os.path.relpath(sys.executable) if os.path.abspath(sys.executable).startswith(os.getcwd() + os.sep) \
        else sys.executable
    columns = tuning.result_columns(spec, metric)
    rows = tuning.sort_rows([tuning.trial_row(t, spec, metric, mode, python) for t in trials], metric, mode)
    path = os.path.join(spec["sweep_dir"], "results.csv")
    tuning.write_results(path, rows, columns)
    print()
    print(tuning.summary(rows, columns))
    best = next((r for r in rows if f"best_{metric}" in r), None)
    if best is not None:
        print(f"\nBest trial {best['trial']}: {metric} {best[f'best_{metric}']:.6g} at iteration "
              f"{best['best_iteration']} ({best['status']}, {best['run_folder']}):\n    {best['command']}")
    print(f"\nResults: {path}")
    failed = [r["trial"] for r in rows if r["status"] == "error"]
    unfinished = [r["trial"] for r in rows if r["status"] == "unfinished"]
    if unfinished:
        print(f"tune.py: {len(unfinished)} of {len(rows)} trials unfinished: rerun the same command to resume",
              file=sys.stderr)
    if failed:
        print(f"tune.py: {len(failed)} of {len(rows)} trials failed (results.csv, column error)", file=sys.stderr)
    return 1 if failed or unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
