"""fmsearch's command line: the only place that prints for the user, parses argv, or exits."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from fmsearch import files, storage, transfer, workers
from fmsearch.config import ARCHITECTURE_NAMES, NO_PATIENCE, SETTINGS, SWITCHES, TrainConfig
from fmsearch.errors import StudyError, UsageError
from fmsearch.words import count, duration

if TYPE_CHECKING:
    from fmsearch.spec import StudySpec

STUDIES_DIR = Path("studies")
RESULTS_DIR = Path("results")

DEVICE_HELP = "cpu, cuda or mps (default: the best available)"
STORAGE_HELP = f"Optuna storage URL (default ${storage.ENV_URL}, else {storage.DEFAULT_URL})"
OS_FAULTS = (*storage.DISK_FULL, errno.EACCES, errno.EPERM)  # what a user can fix by hand
DEVICE = re.compile(r"cpu|mps|cuda(:[0-9]+)?")  # what torch.device accepts of the devices fmsearch runs on
REPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(@archived-[0-9]{8}T[0-9]{6}Z)?")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class EpochBar:
    """A tqdm bar per epoch for engine.fit's progress protocol."""

    def __init__(self, label: str, epochs: int, position: int = 0):
        self.label = label
        self.epochs = epochs
        self.position = position
        self.bar: tqdm | None = None

    def epoch_start(self, epoch: int, steps: int) -> None:
        self.close()
        self.bar = tqdm(
            total=steps,
            desc=f"{self.label} epoch {epoch}/{self.epochs}",
            unit="batch",
            position=self.position,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def step(self) -> None:
        self.bar.update()

    def annotate(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def epoch_end(self, metrics: dict) -> None:
        self.annotate(f"val_acc={metrics['val_accuracy']:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleReporter:
    """study.Reporter for the terminal: a live bar per trial, then one line per finished trial."""

    def __init__(self, worker: int = 0):
        self.worker = worker

    def trial_progress(self, study_name: str, number: int, max_epochs: int) -> EpochBar:
        return EpochBar(f"{study_name} #{number}", max_epochs, position=self.worker)

    def warn(self, line: str) -> None:
        tqdm.write(f"warning: {line}", file=sys.stderr)

    def trial_end(self, outcome) -> None:
        value = "-" if outcome.value is None else f"{outcome.value:.4f}"
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in outcome.params.items()
        )
        why = (
            outcome.stop_reason
            if outcome.best_epoch is None
            else f"{outcome.stop_reason}, best epoch {outcome.best_epoch}"
        )
        if outcome.error:
            why = f"{why}: {outcome.error}"
        tqdm.write(
            f"{outcome.study_name} #{outcome.number} {outcome.state} {value} [{why}] {params}",
            file=sys.stdout,
        )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


TIME_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([hms])")


def _time_budget(text: str) -> float:
    """'1h', '90m', '45s', '1h30m' or plain seconds ('600') -> seconds."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        seconds = float(text)
    elif re.fullmatch(f"({TIME_PART.pattern})+", text):
        scale = {"h": 3600, "m": 60, "s": 1}
        seconds = sum(float(number) * scale[unit] for number, unit in TIME_PART.findall(text))
    else:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write e.g. 1h, 90m, 1h30m or 600s")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} leaves no time: give a duration above zero")
    return seconds


def _positive_ints(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.split(","))


def _options(text: str) -> tuple[str, ...]:
    chosen = () if text == "none" else tuple(text.split(","))
    unknown = [option for option in chosen if option not in SWITCHES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown option {unknown[0]!r}: choose from {','.join(SWITCHES)} or none"
        )
    return chosen


def _is_loopback(host: str) -> bool:
    """Whether `host` is this machine alone: localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost, or 0.0.0.0's kin: treat as reachable


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {text}")
    return value


def _device(text: str) -> str:
    """A device name (cpu, cuda, cuda:1, mps); whether it exists is checked later."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda, cuda:N or mps")
    return text


def _storage_url(text: str) -> str:
    try:
        return storage.check_url(text)
    except storage.StorageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _report_name(text: str) -> str:
    if not REPORT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a study name (it names a folder under results/): e.g. semi, "
            "or semi@archived-20250101T000000Z"
        )
    return text


def _load_splits(device_name: str | None, pool_limit: int | None = None, val_size: int | None = None):
    from fmsearch import data, engine

    device = engine.resolve_device(device_name)
    print(f"data: {_ensure_data()}", file=sys.stderr)
    config = data.DataConfig(pool_limit=pool_limit)
    if val_size is not None:
        config = replace(config, val_size=val_size)
    return device, data.load_splits(config, device)


def _format_row(values: list, widths: list[int]) -> str:
    return "  ".join(str(v).rjust(w) for v, w in zip(values, widths, strict=True))


def print_history(history: list[dict]) -> None:
    """The per-epoch table of a fit."""
    columns = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds"]
    if "mask_rate" in history[0]:
        columns += ["unlabeled_loss", "mask_rate", "pseudo_accuracy"]
    widths = [max(len(c), 8) for c in columns]
    print(_format_row(columns, widths))
    for row in history:
        print(_format_row([row[c] if c == "epoch" else f"{row[c]:.4f}" for c in columns], widths))


def cmd_data(args: argparse.Namespace) -> None:
    from fmsearch import data

    print(f"data: {data.ensure()}")


def train_config(args: argparse.Namespace):
    """The TrainConfig that `fmsearch train`'s flags ask for; an unset flag keeps its default."""
    config_names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in config_names and v is not None}
    if args.no_patience:
        values["patience"] = None
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> None:
    from fmsearch import engine, runner

    config = train_config(args)
    device, splits = _load_splits(args.device, args.pool_limit, args.val_size)
    bar = EpochBar(config.arch, config.epochs)
    history: list[dict] = []

    def show(epoch: int, metrics: dict) -> None:
        bar.annotate(f"val_acc={metrics['val_accuracy']:.4f}")
        history.append(metrics)
        if args.json:  # the curve so far, so a killed run keeps it
            _write_json(Path(args.json), {"config": asdict(config), "history": history, "finished": False})

    try:
        done = runner.run(
            config, splits, RESULTS_DIR, hooks=[show], progress=bar, on_teachers=print_teachers,
            log=lambda line: print(line, file=sys.stderr),
        )  # fmt: skip
    finally:
        bar.close()
    result = done.result
    print_history(result.history)
    by_monitor = engine.score_by_monitor(result, splits, config)
    test = by_monitor[config.monitor]  # the weights the run keeps, scored once
    print(f"execution: {describe_execution(result.execution)}")
    print(
        f"device {device}, {result.labeled_images} labeled images, stopped: {result.stop_reason}, "
        f"best epoch {result.best_epoch} by {config.monitor} (val_accuracy {result.best['val_accuracy']:.4f})"
    )
    # The rule was fixed before training; the other rules' picks are shown by validation alone (their
    # test scores go to --json, for the record), so that no one picks a rule by its test score.
    for monitor, record in by_monitor.items():
        if monitor != config.monitor:
            kept = f"epoch {record['epoch']} (val_accuracy {record['val_accuracy']:.4f})"
            print(f"  {monitor} would keep {kept}")
    if config.monitor != "val_accuracy":
        print("  a study trial keeps its best epoch by its metric, val_accuracy: --monitor repeats one")
    print(f"test_loss {test['test_loss']:.4f}  test_accuracy {test['test_accuracy']:.4f}")
    if args.json:
        scores = {key: test[key] for key in ("test_loss", "test_accuracy", "test_recall")}
        record = runner.provenance(device) | done.record() | {"by_monitor": by_monitor, **scores}
        _write_json(Path(args.json), record | {"finished": True})


def print_teachers(team) -> None:
    print(
        f"teachers: {len(team.members)}, {team.epochs} epochs, {team.seconds:.0f} s; ensemble "
        f"val_accuracy {team.val_accuracy:.4f}, test_accuracy {team.test_accuracy:.4f}; "
        f"targets right on {team.target_accuracy:.4f} of the unlabeled pool"
    )


def describe_execution(run) -> str:
    """'bf16 off, channels_last on, compile off, eval batch 256, 2 threads (cache ...)'."""
    switches = ", ".join(
        f"{name} {'on' if getattr(run, name) else 'off'}" for name in ("amp", "channels_last", "compile")
    )
    return f"{switches}, eval batch {run.eval_batch_size}, {count(run.threads, 'thread')} ({run.source})"


def _write_json(path: Path, record: dict) -> None:
    files.write_json(path, record)


def cmd_study(args: argparse.Namespace) -> None:
    from fmsearch import spec

    workers.catch_termination()  # a scheduler's time limit stops the trials as Ctrl-C does
    started = time.time()
    study_spec = spec.parse(spec.find(args.name, STUDIES_DIR)).overridden(args.trials, args.epochs)
    from fmsearch import cost, engine, study  # torch: a bad study file is refused before it loads

    options = study.RunOptions(
        deadline=started + args.time if args.time else None,
        storage=args.storage,
        jobs=args.jobs,
        device=engine.resolve_device(args.device),
        results_dir=RESULTS_DIR,
        heartbeat_interval=args.heartbeat,
        grace_period=4 * args.heartbeat,
    )
    storage.quiet_optuna()
    print(f"data: {_ensure_data()}")
    splits = study.load_splits(study_spec, options)  # a pool_limit the data cannot meet stops here
    if not args.fresh:
        _resume_from_export(study_spec.name, options.storage)
    archived = study.prepare(study_spec, options, archive_changed=args.archive_changed)
    for old, new in archived.items():
        spec_name = storage.study_name_parts(new)[0]
        print(f"archived {old} as {new} (its trials are kept; `fmsearch report {spec_name}`)")
    print(f"study {study_spec.name}: {study_spec.description}")
    print(f"storage {storage.mask(options.storage)}; watch it live with `make dashboard`")
    left = study.trials_left(study_spec, options)
    if any(left.values()):
        _print_plan(study_spec, cost.plan(study_spec, splits, left), args.time)
    else:
        print(f"every condition has its {study_spec.trials} finished trials: nothing left to search")
    summaries = study.run(study_spec, options, ConsoleReporter, splits)
    for summary in summaries:
        states = ", ".join(f"{n.lower()} {c}" for n, c in sorted(summary.states.items()))
        print(f"\n{summary.study_name}: {states}")
        if summary.best_value is None:
            print("  no complete trial")
            continue
        print(f"  best trial #{summary.best_trial}: val_accuracy {summary.best_value:.4f}", end="")
        print(f", test_accuracy {summary.test.test_accuracy:.4f}" if summary.test else "")
        for key, value in summary.best_params.items():
            print(f"  {key:>16} = {value:.4g}" if isinstance(value, float) else f"  {key:>16} = {value}")
    short = [s for s in summaries if s.finished < study_spec.trials]
    if short and options.out_of_time():
        finished = ", ".join(f"{s.study_name} {s.finished}/{study_spec.trials}" for s in short)
        print(
            f"\ntime budget {duration(args.time)} reached: no trial started after it; finished {finished}. "
            "Run the same command to resume."
        )


def _own_runs(study_spec: StudySpec) -> str:
    """Which conditions count their own run as the first confirmation seed, since they search nothing
    (spec.searches_nothing): 'each', 'where nothing is searched', or '' where every one searches."""
    conditions = study_spec.condition_list()
    own = sum(map(study_spec.searches_nothing, conditions))
    return "each" if own == len(conditions) else "where nothing is searched" if own else ""


def _print_plan(study_spec: StudySpec, plan, time_budget: float | None) -> None:
    """What the rest of a study costs at most (cost.Plan), per condition, then in all."""
    epochs = "/".join(str(e) for e in sorted({c.max_epochs for c in plan.conditions if c.trials}))
    trials = count(sum(c.trials for c in plan.conditions), "trial")
    execution = describe_execution(plan.execution)
    print(f"cost: at most {trials} of {epochs} epochs, each epoch timed here ({execution}):")
    for c in plan.conditions:
        if not c.trials:
            print(f"  {c.study_name}: searched")
            continue
        epochs = ", ".join(f"{name} {seconds:.1f}" for name, seconds in c.epoch_seconds.items())
        teams = f"; teachers {c.teams} x {duration(c.team_seconds)}" if c.teams else ""
        print(
            f"  {c.study_name}: {count(c.trials, 'trial')} x {c.max_epochs} epochs, s/epoch {epochs}{teams}"
        )
    seeds = count(plan.confirm_seeds, "seed")
    if where := _own_runs(study_spec):
        seeds += f", the search's own run one of them: {count(plan.confirm_seeds - 1, 'rerun')} {where}"
    print(
        f"  = {duration(plan.search_seconds)} of search and {duration(plan.confirm_seconds)} of "
        f"confirmation ({seeds}) at most: {duration(plan.max_seconds)} (pruning, early "
        "stopping and cached teachers cut this); smaller: --trials, --epochs, --time, or STUDY=smoke"
    )
    if time_budget:
        print(f"  time budget {duration(time_budget)}: no trial starts after it; rerunning resumes")


def _resume_from_export(name: str, url: str) -> None:
    """A storage without any of the study's studies takes the trials committed beside its report."""
    rdb = storage.open_storage(url)
    lines = transfer.resume_from_export(rdb, name, RESULTS_DIR)
    rdb.engine.dispose()
    if lines:
        path = transfer.export_path(RESULTS_DIR, name)
        print(f"resuming from {path} (the storage held none of its trials; --fresh starts over):")
        for line in lines:
            print(f"  {line}")


def cmd_report(args: argparse.Namespace) -> None:
    from fmsearch import report

    storage.quiet_optuna()
    rdb = storage.open_storage(args.storage)
    summary, images = report.write_report(rdb, args.name, RESULTS_DIR, storage.DatabaseArtifactStore(rdb))
    exported = transfer.write_export(rdb, args.name, RESULTS_DIR)
    figures = ", ".join(p.name for p in images)
    print(
        f"wrote {summary}, trials.csv, {figures} and {exported.name} (the trials, for `fmsearch import`); "
        "the dashboard shows the figures too"
    )


def cmd_import(args: argparse.Namespace) -> None:
    storage.quiet_optuna()
    path = Path(args.source) if args.source else transfer.export_path(RESULTS_DIR, args.name)
    payload = transfer.read_export(path)
    if payload.get("study") != args.name:
        raise transfer.TransferError(f"{path} holds study {payload.get('study')!r}, not {args.name!r}")
    rdb = storage.open_storage(args.storage)
    for line in transfer.import_studies(rdb, payload):
        print(line)


def cmd_dashboard(args: argparse.Namespace) -> None:
    import optuna_dashboard

    remote = not _is_loopback(args.host)
    if remote and not args.allow_remote:
        raise UsageError(
            f"--host {args.host} would serve the dashboard to other machines, and it has no login: anyone "
            "who reaches it can delete studies; keep the default 127.0.0.1 (an SSH tunnel reaches it "
            "from elsewhere), or add --allow-remote"
        )
    storage.quiet_optuna()
    rdb = storage.open_storage(args.storage)
    if remote:
        print(
            f"warning: serving on {args.host} with no login: whoever reaches port {args.port} can tell "
            "trials, delete studies and replace their files",
            file=sys.stderr,
        )
    print(
        f"optuna-dashboard on http://{args.host}:{args.port}/ for {storage.mask(args.storage)} "
        "(Ctrl-C stops it)",
        flush=True,
    )
    optuna_dashboard.run_server(
        rdb, host=args.host, port=args.port, artifact_store=storage.DatabaseArtifactStore(rdb)
    )


def _print_timings(title: str, timings, reference: str) -> None:
    print(f"{title}: images/s, median of the repeats; spread (max - min) / median; x: against {reference}")
    header = ("threads", "contender", "median", "spread", "x", "accuracy", "GFLOP/s")
    print("  {:>7}  {:<24} {:>8} {:>6} {:>6} {:>8} {:>8}".format(*header))
    for t in timings:
        print(
            f"  {t.threads:>7}  {t.name:<24} {t.median:8.0f} {t.spread:6.1%} {t.ratio:6.2f} "
            f"{t.accuracy:8.4f} {t.flops_per_second / 1e9:8.2f}"
        )


def cmd_bench(args: argparse.Namespace) -> None:
    import time

    import torch

    from fmsearch import bench, engine

    device = engine.resolve_device(args.device)
    config = bench.BenchConfig(
        arch=args.arch,
        batch_size=args.batch_size,
        repeats=args.repeats,
        pool_limit=args.pool_limit,
        options=args.options,
        threads=args.threads,
        eval_batch_sizes=args.eval_batch_sizes,
    )
    print(f"data: {_ensure_data()}")
    print(
        f"bench: {config.arch} CNN, batch {config.batch_size}, {config.repeats} timed epochs per contender "
        f"after a warm-up, on {device} ({bench.cpu_name()}), torch {torch.__version__}"
    )
    report = bench.run(config, device)
    print(f"fmsearch defaults on this machine: {describe_execution(report.chosen)}")
    _print_timings("training", report.training, "the assignment's loop")
    _print_timings("evaluation", report.evaluation, "the assignment's evaluation loop")
    for arch, flops in report.flops_per_image.items():
        print(
            f"{arch} CNN: {flops['forward'] / 1e6:.2f} MFLOP per image forward, "
            f"{flops['train_step'] / 1e6:.2f} MFLOP per training step"
        )
    for threads, rate in report.matmul_flops_per_second.items():
        best = max(t.flops_per_second for t in report.training if t.threads == threads)
        bf16 = report.bf16_matmul_flops_per_second[threads]
        print(
            f"matmul on {threads} threads: float32 {rate / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s; "
            f"the fastest training contender reaches {best / rate:.1%} and {best / bf16:.1%} of them"
        )
    record = {**report.as_json(), "command": " ".join(sys.argv)}
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.arch}-{device.type}"
    print(f"wrote {bench.save(record, RESULTS_DIR / 'bench', stem)}")


def _ensure_data() -> str:
    from fmsearch import data

    return data.ensure()


def _checked(declared) -> Callable[[str], Any]:
    """An argparse type that converts a flag's text and checks it against the parameter's range."""

    def convert(text: str):
        value = declared.type(text)
        if not declared.in_range(value):
            raise argparse.ArgumentTypeError(f"must be {declared.range_text()}, got {text}")
        return value

    convert.__name__ = declared.type.__name__  # argparse's "invalid float value" names it
    return convert


def _default_text(declared) -> str:
    if declared.name in SETTINGS:
        return "chosen by timing on this machine"
    if declared.type is bool:
        return "on" if declared.default else "off"
    return "unset" if declared.default is None else str(declared.default)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, from its declaration: --batch-size, --no-debias, ..."""
    from fmsearch.params import flag as flag_of
    from fmsearch.params import parameters

    for declared in parameters(TrainConfig).values():
        flag = flag_of(declared.name)
        help = f"{declared.help} (default {_default_text(declared)})"
        if declared.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        elif declared.choices:
            parser.add_argument(flag, choices=declared.choices, help=help)
        else:
            parser.add_argument(flag, type=_checked(declared), help=help)
    parser.add_argument(NO_PATIENCE, action="store_true", help="never stop early")


def _add_study_command(sub) -> None:
    """`fmsearch study NAME`: its flags."""
    p = sub.add_parser("study", help="run (or resume) an Optuna study from studies/NAME.toml")
    p.add_argument("name", help="a study file's name under studies/, e.g. semi, or a path to one")
    p.add_argument("--trials", type=_positive_int, help="finished trials per condition (default: the file's)")
    p.add_argument("--jobs", type=_positive_int, default=1, help="worker processes (default 1)")
    p.add_argument("--storage", type=_storage_url, default=storage.default_url(), help=STORAGE_HELP)
    p.add_argument("--device", type=_device, help=DEVICE_HELP)
    p.add_argument("--epochs", type=_positive_int, help="max epochs per trial (default: the file's)")
    p.add_argument(
        "--time",
        type=_time_budget,
        help="wall-clock budget, e.g. 1h or 90m: no trial starts after it, and rerunning resumes "
        "(default: none, run to the trials)",
    )
    p.add_argument(
        "--heartbeat", type=_positive_int, default=5, help="seconds between trial heartbeats (default 5)"
    )
    p.add_argument(
        "--archive-changed",
        action="store_true",
        help="where the study file changed since a condition's trials ran, keep them under "
        "NAME@archived-<time> and start that condition afresh (default: refuse)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="where the storage holds none of the study's trials, start afresh instead of resuming from "
        "the trials committed in results/NAME/storage.json",
    )
    p.set_defaults(func=cmd_study)


def cmd_confirm(args: argparse.Namespace) -> None:
    import optuna

    from fmsearch import confirm, engine, spec, study

    workers.catch_termination()
    started = time.time() if args.since is None else args.since
    study_spec = spec.parse(spec.find(args.name, STUDIES_DIR)).overridden(args.trials, None)
    options = study.RunOptions(
        storage=args.storage,
        jobs=args.jobs,
        device=engine.resolve_device(args.device),
        results_dir=RESULTS_DIR,
        deadline=started + args.time if args.time else None,
    )
    storage.quiet_optuna()
    _resume_from_export(study_spec.name, options.storage)
    rdb = storage.open_storage(options.storage)
    known = set(optuna.get_all_study_names(storage=rdb))
    missing = [n for n in map(study_spec.study_name, study_spec.condition_list()) if n not in known]
    if missing:
        raise StudyError(
            f"study {missing[0]!r} is not in the storage: run `fmsearch study {args.name}` first"
        )
    print(f"data: {_ensure_data()}")
    splits = study.load_splits(study_spec, options)
    seeds = study_spec.confirm.seeds
    own = _own_runs(study_spec)
    if own == "each":
        more = count(max(seeds - 1, 0), "more seed")
        print(f"confirming {study_spec.name}: each condition's run on {more}, its own the first of {seeds}")
    else:
        where = f"; {own}, its own run is the first" if own else ""
        print(
            f"confirming {study_spec.name}: each condition's best trial on {count(seeds, 'new seed')}{where}"
        )
    for done in confirm.confirm(study_spec, rdb, splits, options, log=print):
        print(f"{done.study_name}: trial #{done.source_trial}: {done.text()}")


def _add_bench_command(sub) -> None:
    """`fmsearch bench`: its flags."""
    p = sub.add_parser("bench", help="time fmsearch's training loop against the assignment's loop")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--arch", default="plain", choices=ARCHITECTURE_NAMES, help="architecture (default plain)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="(default 64)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed epochs per contender (default 3)")
    p.add_argument(
        "--pool-limit", type=_positive_int, help="images per epoch (default: the 50,000-image pool)"
    )
    p.add_argument(
        "--options",
        type=_options,
        default=(),
        help=f"fmsearch float32 is also timed with each of these forced on: comma-separated from "
        f"{','.join(SWITCHES)} (default none)",
    )
    p.add_argument(
        "--threads",
        type=_positive_ints,
        default=(),
        help="torch thread counts to time every contender at, e.g. 1,2 (default: the count chosen here)",
    )
    p.add_argument(
        "--eval-batch-sizes",
        type=_positive_ints,
        default=(),
        help="engine.evaluate batch sizes to time besides the chosen one, e.g. 2048,10000 (default none)",
    )
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fmsearch",
        description="Hyperparameter-search studies of small CNNs on Fashion-MNIST, full- and semi-label.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="find or fetch Fashion-MNIST and verify it")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train one configuration and score it on the test set")
    add_train_arguments(p)
    p.add_argument("--device", type=_device, help=DEVICE_HELP)
    p.add_argument("--pool-limit", type=_positive_int, help="use only this many training-pool images")
    p.add_argument(
        "--val-size", type=_positive_int, help="images held out for validation (default 10,000, as a study's)"
    )
    p.add_argument("--json", help="also write the history and test result to this file")
    p.set_defaults(func=cmd_train)

    _add_study_command(sub)
    p = sub.add_parser("confirm", help="rerun each condition's best trial on new seeds, scored on test")
    p.add_argument("name", help="a study file's name under studies/, e.g. semi, or a path to one")
    p.add_argument("--storage", type=_storage_url, default=storage.default_url(), help=STORAGE_HELP)
    p.add_argument("--device", type=_device, help=DEVICE_HELP)
    p.add_argument(
        "--trials",
        type=_positive_int,
        help="finished trials a condition's search needs before it is confirmed (default: the file's)",
    )
    p.add_argument(
        "--jobs", type=_positive_int, default=1, help="worker processes sharing the reruns (default 1)"
    )
    p.add_argument(
        "--time",
        type=_time_budget,
        help="wall-clock budget, e.g. 1h: no rerun starts after it (default: none)",
    )
    p.add_argument(
        "--since",
        type=float,
        help="the Unix time --time counts from (default: now); `make study` passes its own start, so "
        "that TIME bounds the search and the confirmation together",
    )
    p.set_defaults(func=cmd_confirm)
    _add_bench_command(sub)

    p = sub.add_parser("report", help="draw a study's figures and summary.md from the storage")
    p.add_argument("name", type=_report_name, help="the study's name, e.g. semi")
    p.add_argument("--storage", type=_storage_url, default=storage.default_url(), help=STORAGE_HELP)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "import", help="put a study's trials from results/NAME/storage.json into the storage, to resume there"
    )
    p.add_argument("name", type=_report_name, help="the study's name, e.g. semi")
    p.add_argument("--source", help="the file to read (default: results/NAME/storage.json)")
    p.add_argument("--storage", type=_storage_url, default=storage.default_url(), help=STORAGE_HELP)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on the study storage")
    p.add_argument("--storage", type=_storage_url, default=storage.default_url(), help=STORAGE_HELP)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="let --host be an address other machines reach: the dashboard has no login, and anyone who "
        "reaches it can tell trials, delete studies and replace files",
    )
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fmsearch.errors import FmsearchError

    url = getattr(args, "storage", storage.default_url())
    try:
        args.func(args)
    except (
        FmsearchError
    ) as error:  # a user's mistake: one line; anything else is a bug and keeps its traceback
        print(f"fmsearch {args.command}: error: {storage.scrub(str(error), url)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, workers.Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        if args.command == "study":
            what += "; running trials were marked FAIL (they do not count): rerun to resume"
        print(f"fmsearch {args.command}: {what}", file=sys.stderr)
        return 143 if terminated else 130
    except OSError as error:
        if error.filename is None or error.errno not in OS_FAULTS:
            raise
        print(
            f"fmsearch {args.command}: error: cannot write {error.filename} ({error.strerror}): "
            "free disk space or fix its permissions, then rerun; finished trials are kept",
            file=sys.stderr,
        )
        return 1
    except Exception as error:
        if not storage.is_fault(error):
            raise  # a bug keeps its traceback
        print(f"fmsearch {args.command}: error: {storage.fault_message(error, url)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
