"""A study's lineage: the fingerprint of what its trials mean, what changed, and the archive.

A condition's study records its fingerprint when it is created. A rerun whose study file gives its
trials another meaning is refused with the keys that changed, or (with --archive-changed) keeps the
old trials under an archived name and starts afresh; nothing is deleted until the copy checks out.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from fmsearch import data
from fmsearch.config import SETTINGS, TRAINING_VERSION
from fmsearch.errors import StudyError
from fmsearch.spec import PARAMETERS, Categorical, StudySpec
from fmsearch.storage import Attr, mask, study_name_parts
from fmsearch.storage import study_name as storage_study_name


class StudyChanged(StudyError):
    """A condition's stored trials were run with other settings than the study file now gives."""


def fingerprint(spec: StudySpec, condition: dict[str, Any], config: data.DataConfig) -> dict[str, Any]:
    """Everything that gives a condition's trials their meaning, as JSON-ready values.

    The number of trials is left out on purpose: raising it continues the same study.
    """
    record = {
        "condition": condition,
        "fixed": spec.fixed_for(condition),
        "space": {name: asdict(dimension) for name, dimension in spec.space.items()},
        "max_epochs": spec.setting("max_epochs", condition),
        "batch_size": spec.batch_size,
        "patience": spec.setting("patience", condition),
        "metric": spec.metric,
        "pruner": asdict(spec.pruner),
        "sampler": asdict(spec.sampler),
        "data": {
            "pool_limit": config.pool_limit,
            "val_size": config.val_size,
            "split_seed": config.split_seed,
        },
        "training": TRAINING_VERSION,
        "defaults": defaults(spec, condition),
    }
    return json.loads(json.dumps(record))  # tuples -> lists, as the storage gives them back


def objectives(given: dict[str, Any], space_choices: list | tuple | None) -> set[str]:
    """The `unlabeled` objectives some trial of a condition may run: its fixed or condition value (else
    the default), and every choice where the space searches `unlabeled`."""
    found = {given["unlabeled"]} if "unlabeled" in given else {PARAMETERS["unlabeled"].default}
    return found | set(space_choices or ())


def reads(name: str, objectives: set[str]) -> bool:
    """Whether a condition running these objectives ever reads training parameter `name`."""
    declared = PARAMETERS.get(name)
    return declared is None or not declared.objectives or bool(objectives & set(declared.objectives))


def defaults(spec: StudySpec, condition: dict[str, Any]) -> dict[str, Any]:
    """The code's defaults that decide a condition's results: every training parameter the study file
    leaves to TrainConfig and that some trial of it may read (vat's only where vat may run). How a run
    executes (config.SETTINGS) is left out: chosen per machine, it moves speed, not accuracy."""
    given = {**spec.fixed_for(condition), **condition}
    unlabeled = spec.space.get("unlabeled")
    running = objectives(given, unlabeled.choices if isinstance(unlabeled, Categorical) else None)
    return {
        name: declared.default
        for name, declared in PARAMETERS.items()
        if name not in given and name not in spec.space and name not in SETTINGS and name != "monitor"
        if reads(name, running)
    }


def _as_read(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint less the [fixed] settings no trial of its condition reads (distill's teachers
    under full labels): adding, removing or changing one leaves the trials meaning what they meant."""
    given = {**fingerprint["fixed"], **fingerprint["condition"]}
    running = objectives(given, fingerprint["space"].get("unlabeled", {}).get("choices"))
    return {**fingerprint, "fixed": {k: v for k, v in fingerprint["fixed"].items() if reads(k, running)}}


def meaningful_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two versioned fingerprints that gives the trials another meaning.

    Left out: a parameter added to the code since (it comes in at a default that trains as before),
    and a [fixed] setting that no trial of the condition reads.
    """
    if "defaults" in old and "defaults" in new:
        new = {**new, "defaults": {k: v for k, v in new["defaults"].items() if k in old["defaults"]}}
    return fingerprint_changes(_as_read(old), _as_read(new))


UNPROVEN = (
    f"training: not recorded (the study predates versioned training), so its trials cannot be shown to "
    f"have trained as version {TRAINING_VERSION} does, nor with today's defaults"
)


def fingerprint_changes(old: Any, new: Any, key: str = "") -> list[str]:
    """'key: old -> new' for each difference, e.g. 'space.lr.low: 0.0001 -> 0.001', 'space.tau added'."""
    comparable = isinstance(old, dict) and isinstance(new, dict) and (old.keys() & new.keys() or not old)
    if not comparable:  # a leaf, or a dimension that became another kind (a range turned into a list)
        return [] if old == new else [f"{key}: {old!r} -> {new!r}"]
    changes = []
    for name in sorted(old.keys() | new.keys()):
        inner = f"{key}.{name}" if key else str(name)
        if name not in old:
            changes.append(f"{inner} added")
        elif name not in new:
            changes.append(f"{inner} removed")
        else:
            changes += fingerprint_changes(old[name], new[name], inner)
    return changes


def legacy_changes(study: optuna.Study, new: dict[str, Any]) -> list[str]:
    """A study from before fingerprints: compare what it did record, and its trials' distributions."""
    attrs = study.user_attrs
    recorded = {
        key: attrs[key]
        for key in (Attr.CONDITION, Attr.FIXED, Attr.MAX_EPOCHS, Attr.BATCH_SIZE)
        if key in attrs
    }
    changes = fingerprint_changes(recorded, {key: new[key] for key in recorded})
    for trial in study.get_trials(deepcopy=False):
        for name, distribution in trial.distributions.items():
            dimension = new["space"].get(name)
            if dimension is None:
                changes.append(f"space.{name} removed")
            elif _distribution_of(dimension) != distribution:
                changes.append(f"space.{name}: {distribution} -> {_distribution_of(dimension)}")
    return sorted(set(changes))


def _distribution_of(dimension: dict[str, Any]) -> optuna.distributions.BaseDistribution:
    """The distribution spec.suggest asks Optuna for, from a fingerprint's dimension."""
    if "choices" in dimension:
        return optuna.distributions.CategoricalDistribution(dimension["choices"])
    if dimension.get("integer"):
        return optuna.distributions.IntDistribution(
            int(dimension["low"]), int(dimension["high"]), log=dimension["log"]
        )
    return optuna.distributions.FloatDistribution(dimension["low"], dimension["high"], log=dimension["log"])


def archived_name(study_name: str, stamp: str) -> str:
    """'semi/labels=10%' -> 'semi@archived-<stamp>/labels=10%', which `fmsearch report` can read."""
    spec_name, condition = study_name_parts(study_name)
    return storage_study_name(f"{spec_name}@archived-{stamp}", condition)


def _snapshot(study: optuna.Study) -> list[tuple]:
    return [
        (t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs, t.intermediate_values)
        for t in study.get_trials(deepcopy=False)
    ]


def archive(rdb: optuna.storages.BaseStorage, study_name: str, stamp: str) -> str:
    """Copy a study under its archived name, check the copy trial by trial, then delete the original.

    Returns the archived name. Nothing is deleted unless the copy holds every trial unchanged.
    """
    target = archived_name(study_name, stamp)
    optuna.copy_study(from_study_name=study_name, from_storage=rdb, to_storage=rdb, to_study_name=target)
    original = optuna.load_study(study_name=study_name, storage=rdb)
    copy = optuna.load_study(study_name=target, storage=rdb)
    if _snapshot(copy) != _snapshot(original) or copy.user_attrs != original.user_attrs:
        raise StudyError(
            f"the copy of {study_name!r} as {target!r} differs from it: nothing was deleted; "
            f"delete {target!r} (optuna delete-study) and rerun"
        )
    copy.set_user_attr(Attr.ARCHIVED_FROM, study_name)
    optuna.delete_study(study_name=study_name, storage=rdb)
    return target


def settle_changes(
    rdb: optuna.storages.BaseStorage,
    fingerprints: dict[str, dict[str, Any]],
    storage_url: str,
    grace_period: int,
    archive_changed: bool = False,
) -> dict[str, str]:
    """Check each study's stored trials against its new fingerprint (study name -> fingerprint).

    A study whose trials mean something else raises StudyChanged naming the keys, unless
    `archive_changed`: then its trials are kept under an archived name (`archive`) and the study
    starts afresh. Returns {old name: archived name}.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    changed = {}
    existing = set(optuna.get_all_study_names(storage=rdb))
    for name, new in fingerprints.items():
        if name not in existing:
            continue
        study = optuna.load_study(study_name=name, storage=rdb)
        if not study.get_trials(deepcopy=False):
            continue
        old = study.user_attrs.get(Attr.FINGERPRINT)
        if old is not None and "training" in old:
            changes = meaningful_changes(old, new)
        elif old is not None:  # from before versions: what it recorded is compared, the rest unproven
            changes = [UNPROVEN] + fingerprint_changes(old, {k: v for k, v in new.items() if k in old})
        else:
            changes = [UNPROVEN] + legacy_changes(study, new)
        if changes:
            changed[name] = (study, changes)
    if changed and not archive_changed:
        name, (study, changes) = next(iter(changed.items()))
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise StudyChanged(
            f"study {name!r} in {mask(storage_url)} holds {len(study.trials)} trials run with "
            f"other settings ({shown}): they must not mix with new ones; give the study file a new name, "
            f"or rerun with --archive-changed to keep them as {archived_name(name, stamp)!r} and start afresh"
        )
    archived = {}
    for name, (study, _) in changed.items():
        fail_stale_trials(study)
        if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
            raise StudyError(
                f"study {name!r} has running trials: stop its workers (or wait "
                f"{grace_period} s for a dead one to be failed) before archiving it"
            )
        archived[name] = archive(rdb, name, stamp)
    return archived
