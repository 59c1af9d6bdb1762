"""A study's trials as text: written beside its report, read back into any storage to resume there.

The database stays out of git (it holds weights and grows with every figure), but the search it
records is hours of CPU. `fmsearch report` therefore also writes results/<study>/storage.json: every
condition's study and its confirmation study, with each trial's parameters, distributions, values,
per-epoch reports, user attributes and times. `fmsearch import` puts them into a storage that lacks
them, under the same numbers, so the same `fmsearch study` and `fmsearch confirm` resume where they
stopped, on a fresh checkout or another machine.

Weights and figures do not travel. A condition's best trial keeps its recorded test score; a later
trial that beats it stores its own weights as usual.
"""

from __future__ import annotations

import datetime
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from fmsearch.errors import FmsearchError
from fmsearch.files import write_atomic
from fmsearch.storage import ARTIFACT_LINK, CONFIRM, STALE, Attr, study_name_parts

FORMAT = "fmsearch-trials/1"
FILE_NAME = "storage.json"


class TransferError(FmsearchError):
    pass


def export_path(results_dir: Path, name: str) -> Path:
    """results/<study>/storage.json."""
    return Path(results_dir) / name / FILE_NAME


def study_names(storage, name: str) -> list[str]:
    """The studies of spec `name` in the storage: its conditions' and their confirmations' (not its
    archived ones, which are other studies)."""
    return [
        n
        for n in optuna.get_all_study_names(storage=storage)
        if study_name_parts(n)[0] in (name, name + CONFIRM)
    ]


def _stamp(moment: datetime.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _trial_record(trial: FrozenTrial, now: datetime.datetime) -> dict[str, Any]:
    """One trial as JSON. A trial still running is written as failed, as a dead worker's trial becomes:
    its number is kept, and it does not count toward the study's trials. An enqueued trial not yet
    started stays waiting, its parameters with it, so the study still runs it."""
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k != Attr.WEIGHTS}  # weights stay behind
    state, start, complete = trial.state, trial.datetime_start, trial.datetime_complete
    if state == TrialState.RUNNING:
        state, complete = TrialState.FAIL, now
        user_attrs[Attr.STOP_REASON] = STALE
    if state != TrialState.WAITING:
        start = start or now
    return {
        "number": trial.number,
        "state": state.name,
        "values": trial.values,
        "datetime_start": _stamp(start),
        "datetime_complete": _stamp(complete),
        "params": trial.params,
        "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
        "intermediate_values": {str(step): value for step, value in trial.intermediate_values.items()},
        "user_attrs": user_attrs,
        "system_attrs": {k: v for k, v in trial.system_attrs.items() if not k.startswith(ARTIFACT_LINK)},
    }


def export(storage, name: str) -> dict[str, Any]:
    """Every study of spec `name` with all its trials, as a JSON-ready dict."""
    names = study_names(storage, name)
    if not names:
        raise TransferError(f"no study named {name!r} in the storage: run `make study STUDY={name}` first")
    now = datetime.datetime.now()
    studies = []
    for study_name in sorted(names):
        study = optuna.load_study(study_name=study_name, storage=storage)
        studies.append(
            {
                "name": study_name,
                "directions": [d.name for d in study.directions],
                "metric_names": study.metric_names,
                "user_attrs": study.user_attrs,
                "trials": [_trial_record(t, now) for t in study.get_trials(deepcopy=False)],
            }
        )
    return {"format": FORMAT, "study": name, "exported": now.isoformat(), "studies": studies}


def write_export(storage, name: str, results_dir: Path) -> Path:
    """results/<name>/storage.json (export), written atomically."""
    payload = export(storage, name)
    path = export_path(results_dir, name)
    text = json.dumps(payload, indent=1, sort_keys=True, allow_nan=True) + "\n"
    write_atomic(path, lambda partial: partial.write_text(text))
    return path


def read_export(path: Path) -> dict[str, Any]:
    """The payload `write_export` wrote, checked for its format; a clear error where it is not one."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise TransferError(
            f"{path} does not exist: `fmsearch report NAME` writes it from a storage that holds the study"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TransferError(f"{path} is not readable as JSON ({error}): restore it from git") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TransferError(f"{path} is not an fmsearch trials file ({FORMAT}): restore it from git")
    return payload


def _frozen(record: dict[str, Any]) -> FrozenTrial:
    values = record["values"]
    return FrozenTrial(
        number=record["number"],
        state=TrialState[record["state"]],
        value=None,
        values=values,
        datetime_start=(
            datetime.datetime.fromisoformat(record["datetime_start"]) if record["datetime_start"] else None
        ),
        datetime_complete=(
            datetime.datetime.fromisoformat(record["datetime_complete"])
            if record["datetime_complete"]
            else None
        ),
        params=record["params"],
        distributions={k: json_to_distribution(d) for k, d in record["distributions"].items()},
        user_attrs=record["user_attrs"],
        system_attrs=record["system_attrs"],
        intermediate_values={int(step): value for step, value in record["intermediate_values"].items()},
        trial_id=0,  # the storage gives its own
    )


def import_studies(storage, payload: dict[str, Any]) -> list[str]:
    """Put the payload's studies into the storage; one line per study saying what was done.

    A study the storage lacks, or holds without a trial (`fmsearch study` created it and stopped), gets
    every trial under its own number. A study that already has trials is left as it is: merging two
    histories would renumber one of them, and the confirmation studies name search trials by number.
    """
    done = []
    existing = set(optuna.get_all_study_names(storage=storage))
    for record in payload["studies"]:
        name = record["name"]
        if name in existing:
            study = optuna.load_study(study_name=name, storage=storage)
            held = len(study.get_trials(deepcopy=False))
            if held:
                done.append(f"{name}: left as it is (the storage already holds {held} trials)")
                continue
        else:
            directions = [StudyDirection[d] for d in record["directions"]]
            study = optuna.create_study(storage=storage, study_name=name, directions=directions)
        if record["metric_names"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(record["metric_names"])
        for key, value in record["user_attrs"].items():
            study.set_user_attr(key, value)
        trials = [_frozen(t) for t in sorted(record["trials"], key=lambda t: t["number"])]
        study.add_trials(trials)
        numbers = [t.number for t in study.get_trials(deepcopy=False)]
        if numbers != [t.number for t in trials]:  # a gap in the file's numbering would shift the rest
            raise TransferError(
                f"{name}: the trials came back as numbers {numbers[:3]}..., not the file's: the file was "
                "edited; restore it from git and import into a storage without the study"
            )
        counts = Counter(t.state.name for t in trials)
        states = ("COMPLETE", "PRUNED", "FAIL") + (("WAITING",) if counts["WAITING"] else ())
        shown = ", ".join(f"{counts[s]} {s.lower()}" for s in states)
        done.append(f"{name}: {len(trials)} trials ({shown})")
    return done


def resume_from_export(storage, name: str, results_dir: Path) -> list[str] | None:
    """Import results/<name>/storage.json when the storage holds none of the study's studies (a fresh
    checkout, another machine): the lines import_studies says. None where there was nothing to do."""
    path = export_path(results_dir, name)
    if study_names(storage, name) or not path.exists():
        return None
    return import_studies(storage, read_export(path))
