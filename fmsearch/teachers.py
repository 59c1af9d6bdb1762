"""Teachers for the distill objective: K labels-only models, cached on disk, and their soft targets.
A warm-started pseudo run asks for teacher 0 alone, and starts from its weights.

Each teacher trains on the student's labeled subset with the strongest labels-only recipe measured
(adam 1e-3, cosine, patience 5; weak augmentation for the plain CNN only, which it helps and the
adaptive CNN it hurts), or, under teacher_recipe "student", as the student does on its labels, so
that a study searching lr and dropout tunes its teachers too. Teacher k uses seed
`seed + 1000 * k`, so teacher 0 is the labels-only control of the same seed. A teacher is cached
under a key of everything that determines it: the pool, validation and labeled images, its training
config and its seed. Trials that share a subset and a recipe share teachers; a changed key trains a
new one. An entry holds the teacher's logits, plain and mirrored, on the pool, the validation and
the test images, so a trial that reuses it runs no model: its targets and its ensemble's scores are
arithmetic on those logits.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fmsearch.config import TRAINING_VERSION
from fmsearch.data import Splits
from fmsearch.engine import TrainConfig, fit, logits_of, score_by_monitor
from fmsearch.files import write_atomic, write_json
from fmsearch.params import parameters
from fmsearch.semi import LabeledSubset
from fmsearch.speed import SETTINGS, Execution, settle

SEED_STRIDE = 1000  # teacher k's seed is the student's plus k times this
CACHE_VERSION = 2  # 2: an entry holds the validation and test logits too; older entries are retrained
SPLITS = ("pool", "val", "test")  # the images an entry holds logits for


# What a teacher takes from its student under teacher_recipe "student": how the student trains on labels.
STUDENT_TRAINING = ("optimizer", "lr", "dropout", "weight_decay", "nesterov", "schedule", "augment")


def recipe(config: TrainConfig, k: int) -> TrainConfig:
    """Teacher k's training config for a student `config`: labels only, on the student's subset, for
    teacher_epochs with patience 5, by the control's recipe (adam 1e-3, cosine, weak augmentation for
    the plain CNN only) or, under teacher_recipe "student", by the student's own (STUDENT_TRAINING).
    The two agree for a student at the control's settings, and then share cache entries."""
    teacher = replace(
        TrainConfig(),
        arch=config.arch,
        seed=config.seed + SEED_STRIDE * k,
        labeled_fraction=config.labeled_fraction,
        labeled_count=config.labeled_count,
        epochs=config.teacher_epochs,
        batch_size=config.batch_size,
        schedule="cosine",
        patience=5,
        augment=config.arch == "plain",
    )
    if config.teacher_recipe == "student":
        teacher = replace(teacher, **{name: getattr(config, name) for name in STUDENT_TRAINING})
    return teacher


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Fields only an unlabeled objective reads, which a labels-only teacher never does, are left out of
# the key, so that adding one keeps every cached teacher; these were keyed before that rule, and stay.
KEYED_OBJECTIVE_FIELDS = frozenset(
    ("tau", "lambda_u", "debias", "warmup_epochs", "teachers", "teacher_epochs", "temperature", "tta")
    + ("align", "vat_eps", "vat_xi", "entropy_weight")
)
# Fields every objective reads, added after the cache's keys were first made: keyed only away from
# their default, so that adding one keeps every cached teacher (a teacher never sets one).
KEYED_AWAY_FROM_DEFAULT = frozenset(("keep_ema",))


def cache_key(teacher: TrainConfig, splits: Splits, subset: LabeledSubset) -> str:
    """A name for everything that determines a teacher's weights.

    How it executes (speed.SETTINGS) is left out: it changes the speed, not what is learned.
    """
    data = f"{splits.digest}-{_digest(subset.targets)}"
    declared = parameters(TrainConfig)

    def keyed(name: str, value) -> bool:
        if name in SETTINGS:
            return False
        if name in KEYED_AWAY_FROM_DEFAULT:
            return value != declared[name].default
        return not declared[name].objectives or name in KEYED_OBJECTIVE_FIELDS

    config = {k: v for k, v in asdict(teacher).items() if keyed(k, v)}
    versions = {"version": CACHE_VERSION, "training": TRAINING_VERSION}
    text = json.dumps({"config": config, "data": data, **versions}, sort_keys=True)
    return f"{teacher.arch}-seed{teacher.seed}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass
class Teachers:
    """The teachers' soft targets for every pool image, and what they cost."""

    probs: torch.Tensor  # (N, C) float32 on the pool's device; rows sum to 1
    members: list[dict] = field(default_factory=list)  # per teacher: seed, epochs, seconds, accuracies
    val_accuracy: float = 0.0  # of the ensemble (with the mirror where tta applies)
    test_accuracy: float = 0.0  # of the ensemble; for the report only, never for selection
    target_accuracy: float = 0.0  # argmax of the targets against the hidden labels of the unlabeled pool
    rounds: list[dict] = field(default_factory=list)  # Noisy Student's earlier students (runner.run)
    control_state: dict[str, torch.Tensor] | None = None  # teacher 0's weights, for a warm start

    @property
    def seconds(self) -> float:
        """Training time of every teacher, including those loaded from the cache."""
        return sum(m["seconds"] for m in self.members)

    @property
    def epochs(self) -> int:
        return sum(m["epochs"] for m in self.members)


def _logits(model: torch.nn.Module, images: torch.Tensor, splits: Splits, run: Execution) -> torch.Tensor:
    """(2, N, C) float32 logits of each image and of its mirror."""

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return splits.normalize(x).flip(-1)

    return torch.stack([logits_of(model, images, view, run) for view in (splits.normalize, mirrored)])


def _split_images(splits: Splits) -> dict[str, torch.Tensor]:
    return {"pool": splits.train_images, "val": splits.val_images, "test": splits.test_images}


def _train_or_load(
    teacher: TrainConfig,
    splits: Splits,
    subset: LabeledSubset,
    folder: Path,
    log: Callable[[str], None],
    run: Execution,
    weights: bool = False,
) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The teacher's record, its (2, N, C) logits (image, mirror) on each of SPLITS and, with
    `weights`, its best-epoch weights (else None): from the cache or trained now."""
    folder.mkdir(parents=True, exist_ok=True)
    name = cache_key(teacher, splits, subset)
    record_path, logits_path = folder / f"{name}.json", folder / f"{name}-logits.pt"
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two workers wanting one teacher: one trains, one waits
        if record_path.exists() and logits_path.exists():
            state_path = folder / f"{name}.pt" if weights else None
            cached, problem = _read_cached(record_path, logits_path, splits, state_path)
            if cached is not None:
                log(f"teacher seed {teacher.seed}: from the cache ({record_path.name})")
                return cached
            log(f"teacher seed {teacher.seed}: cache entry {record_path.name} {problem}: training it again")
        log(f"teacher seed {teacher.seed}: training up to {teacher.epochs} epochs")
        result = fit(teacher, splits, subset=subset, execution=run)
        logits = {
            name: _logits(result.model, images, splits, run) for name, images in _split_images(splits).items()
        }
        test_accuracy = float((logits["test"][0].argmax(1) == splits.test_labels).float().mean())
        record = {
            "seed": teacher.seed,
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "seconds": result.seconds,
            "val_accuracy": result.best["val_accuracy"],
            "test_accuracy": test_accuracy,
            "by_monitor": score_by_monitor(result, splits, teacher),
            "config": asdict(teacher),
            "state": f"{name}.pt",
        }
        _atomic_save(result.best_state, folder / f"{name}.pt")
        _atomic_save({name: views.cpu() for name, views in logits.items()}, logits_path)
        write_json(record_path, record)  # the record last: it marks the entry complete
        return record, logits, result.best_state if weights else None


RECORD_KEYS = {"seed", "epochs", "best_epoch", "seconds", "val_accuracy", "test_accuracy", "by_monitor"}


READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError)


def _read_cached(
    record_path: Path, logits_path: Path, splits: Splits, state_path: Path | None = None
) -> tuple[tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None, str]:
    """A cache entry's record, logits and, from `state_path`, weights (else None); or None and what
    is wrong with it (a crash mid-write on a system without fsync, a file cut short, an entry of
    another shape): such an entry is retrained."""
    device = splits.train_images.device
    try:
        record = json.loads(record_path.read_text())
        logits = torch.load(logits_path, map_location=device, weights_only=True)
    except READ_ERRORS as error:
        return None, f"is unreadable ({type(error).__name__})"
    if not isinstance(record, dict) or not set(record) >= RECORD_KEYS:
        return None, "holds a record of another shape"
    sizes = {name: len(images) for name, images in _split_images(splits).items()}
    shapes = {k: getattr(v, "shape", (0, 0))[1] for k, v in logits.items()} if isinstance(logits, dict) else 0
    if shapes != sizes:
        return None, "holds logits of other sizes"
    if state_path is None:
        return (record, logits, None), ""
    try:
        state = torch.load(state_path, map_location=device, weights_only=True)
    except READ_ERRORS as error:
        return None, f"has unreadable weights ({type(error).__name__})"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None, "holds weights of another shape"
    return (record, logits, state), ""


def warm_starts(config: TrainConfig) -> bool:
    """Whether `config` starts from the labels-only control's weights (teacher 0) instead of scratch."""
    return config.unlabeled == "pseudo" and config.warm_start


def count(config: TrainConfig) -> int:
    """How many teachers `config` asks for: distill's team, teacher 0 for a warm start."""
    if config.unlabeled == "distill":
        return config.teachers
    return 1 if warm_starts(config) else 0


def _atomic_save(obj, path: Path) -> None:
    write_atomic(path, lambda partial: torch.save(obj, partial))


def _ensemble(views: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean softmax over teachers and views; each item is (V, N, C) logits."""
    return torch.stack([F.softmax(v / temperature, dim=-1).mean(0) for v in views]).mean(0)


def build(
    config: TrainConfig,
    splits: Splits,
    subset: LabeledSubset,
    cache_dir: Path,
    log: Callable[[str], None] = lambda _: None,
    execution: Execution | None = None,
) -> Teachers:
    """Train (or load) the `count(config)` teachers on `subset` and return their targets for the pool
    and, for a warm start, teacher 0's weights.

    Teachers run as the student does: `execution`, default this machine's choice and what `config` forces.
    """
    run = execution or settle(config, splits.train_images.device)
    members, views, control_state = [], [], None
    for k in range(count(config)):
        teacher = recipe(config, k)
        control = k == 0 and warm_starts(config)
        record, logits, state = _train_or_load(teacher, splits, subset, Path(cache_dir), log, run, control)
        if control:
            control_state = state
        members.append(
            {
                key: record[key]
                for key in ("seed", "epochs", "best_epoch", "seconds", "val_accuracy", "test_accuracy")
            }
        )
        # A teacher that never saw a flipped image can't read one: an adaptive teacher trained without
        # augmentation scored 0.62 on mirrored validation images against 0.876 on the images.
        mirror = config.tta and teacher.augment
        views.append({name: v if mirror else v[:1] for name, v in logits.items()})
    probs = _targets(_ensemble([v["pool"] for v in views], config.temperature), config, subset)

    def ensemble_accuracy(split: str, labels: torch.Tensor) -> float:
        return float((_ensemble([v[split] for v in views], 1.0).argmax(1) == labels).float().mean())

    return Teachers(
        probs=probs,
        members=members,
        val_accuracy=ensemble_accuracy("val", splits.val_labels),
        test_accuracy=ensemble_accuracy("test", splits.test_labels),
        target_accuracy=target_accuracy(probs, subset),
        control_state=control_state,
    )


def _targets(probs: torch.Tensor, config: TrainConfig, subset: LabeledSubset) -> torch.Tensor:
    """The soft targets: `probs`, aligned to the pool's even class mix where `config.align` asks."""
    unlabeled = subset.unlabeled.to(probs.device)
    if config.align and len(unlabeled):
        # Distribution alignment: the pool is stratified, so its class mix is even.
        mix = probs[unlabeled].mean(0)
        probs = probs / mix * (1.0 / probs.shape[1])
        probs = probs / probs.sum(dim=1, keepdim=True)
    return probs


def target_accuracy(probs: torch.Tensor, subset: LabeledSubset) -> float:
    """How often the targets' argmax is the hidden label of an unlabeled pool image (report only)."""
    unlabeled = subset.unlabeled.to(probs.device)
    if not len(unlabeled):
        return 1.0
    hidden = subset.hidden.to(probs.device)
    return float((probs[unlabeled].argmax(1) == hidden[unlabeled]).float().mean())


def student_targets(
    model: torch.nn.Module, config: TrainConfig, splits: Splits, subset: LabeledSubset, run: Execution
) -> torch.Tensor:
    """Noisy Student's next round: a trained student's soft targets for the pool, its predictions on
    each image and its mirror averaged (a student always trains on flips), then aligned as the
    teachers' are."""
    views = _logits(model, splits.train_images, splits, run)
    return _targets(_ensemble([views], config.temperature), config, subset)
