"""Teachers for the distill objective: K labels-only models, cached on disk, and their soft targets.

Each teacher trains on the student's labeled subset with the strongest labels-only recipe measured
(adam 1e-3, cosine, patience 5; weak augmentation for the plain CNN only, which it helps and the
adaptive CNN it hurts). Teacher k uses seed `seed + 1000 * k`, so teacher 0 is the labels-only
control of the same seed. A teacher is cached under a key of everything that determines it: the
pool, validation and labeled images, its training config and its seed. Trials that share a subset
share teachers; a changed key trains a new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fmsearch.data import Splits
from fmsearch.engine import TrainConfig, evaluate, fit, score_by_monitor
from fmsearch.models import build_model
from fmsearch.semi import LabeledSubset

SEED_STRIDE = 1000  # teacher k's seed is the student's plus k times this


def recipe(config: TrainConfig, k: int) -> TrainConfig:
    """Teacher k's training config for a student `config`: labels only, the control's recipe."""
    return replace(
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
        amp=config.amp,
        channels_last=config.channels_last,
    )


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(teacher: TrainConfig, splits: Splits, subset: LabeledSubset) -> str:
    """A name for everything that determines a teacher's weights."""
    data = _digest(splits.train_images, splits.val_images, splits.val_labels, subset.targets)
    text = json.dumps({"config": asdict(teacher), "data": data}, sort_keys=True)
    return f"{teacher.arch}-seed{teacher.seed}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass
class Teachers:
    """The teachers' soft targets for every pool image, and what they cost."""

    probs: torch.Tensor  # (N, C) float32 on the pool's device; rows sum to 1
    members: list[dict] = field(default_factory=list)  # per teacher: seed, epochs, seconds, accuracies
    val_accuracy: float = 0.0  # of the ensemble (with the mirror where tta applies)
    test_accuracy: float = 0.0  # of the ensemble; for the report only, never for selection
    target_accuracy: float = 0.0  # argmax of the targets against the hidden labels of the unlabeled pool

    @property
    def seconds(self) -> float:
        """Training time of every teacher, including those loaded from the cache."""
        return sum(m["seconds"] for m in self.members)

    @property
    def epochs(self) -> int:
        return sum(m["epochs"] for m in self.members)


def _logits(model: torch.nn.Module, images: torch.Tensor, splits: Splits, tta: bool) -> torch.Tensor:
    """(2 or 1, N, C) logits of the image and, with tta, of its mirror."""
    model.eval()
    views = []
    with torch.inference_mode():
        for flip in (False, True) if tta else (False,):
            chunks = []
            for start in range(0, len(images), 4096):
                x = splits.normalize(images[start : start + 4096])
                chunks.append(model(x.flip(-1) if flip else x).float())
            views.append(torch.cat(chunks))
    return torch.stack(views)


def _train_or_load(
    teacher: TrainConfig, splits: Splits, subset: LabeledSubset, folder: Path, log: Callable[[str], None]
) -> tuple[dict, torch.Tensor]:
    """The teacher's record and its (2, N, C) pool logits (image, mirror): from the cache or trained now."""
    folder.mkdir(parents=True, exist_ok=True)
    name = cache_key(teacher, splits, subset)
    record_path, logits_path = folder / f"{name}.json", folder / f"{name}-logits.pt"
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two workers wanting one teacher: one trains, one waits
        if record_path.exists() and logits_path.exists():
            log(f"teacher seed {teacher.seed}: from the cache ({record_path.name})")
            device = splits.train_images.device
            return json.loads(record_path.read_text()), torch.load(logits_path, map_location=device)
        log(f"teacher seed {teacher.seed}: training up to {teacher.epochs} epochs")
        result = fit(teacher, splits, subset=subset)
        test = evaluate(result.model, splits.test_images, splits.test_labels, splits.normalize)
        logits = _logits(result.model, splits.train_images, splits, tta=True)
        record = {
            "seed": teacher.seed,
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "seconds": result.seconds,
            "val_accuracy": result.best["val_accuracy"],
            "test_accuracy": test.accuracy,
            "by_monitor": score_by_monitor(result, splits, teacher),
            "config": asdict(teacher),
            "state": f"{name}.pt",
        }
        _atomic_save(result.best_state, folder / f"{name}.pt")
        _atomic_save(logits.cpu(), logits_path)
        partial = record_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, record_path)  # the record last: it marks the entry complete
        return record, logits


def _atomic_save(obj, path: Path) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _ensemble(views: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean softmax over teachers and views; each item is (V, N, C) logits."""
    return torch.stack([F.softmax(v / temperature, dim=-1).mean(0) for v in views]).mean(0)


def build(
    config: TrainConfig,
    splits: Splits,
    subset: LabeledSubset,
    cache_dir: Path,
    log: Callable[[str], None] = lambda _: None,
) -> Teachers:
    """Train (or load) `config.teachers` teachers on `subset` and return their targets for the pool."""
    members, pool_logits, eval_models, mirrors = [], [], [], []
    for k in range(config.teachers):
        teacher = recipe(config, k)
        record, logits = _train_or_load(teacher, splits, subset, Path(cache_dir), log)
        members.append(
            {key: record[key] for key in ("seed", "epochs", "best_epoch", "seconds")}
            | {
                "val_accuracy": record["val_accuracy"],
                "test_accuracy": record["test_accuracy"],
            }
        )
        # A teacher that never saw a flipped image can't read one: an adaptive teacher trained without
        # augmentation scored 0.62 on mirrored validation images against 0.876 on the images.
        mirror = config.tta and teacher.augment
        pool_logits.append(logits if mirror else logits[:1])
        mirrors.append(mirror)
        model = build_model(teacher.arch, teacher.dropout).to(splits.train_images.device)
        device = splits.train_images.device
        state = torch.load(Path(cache_dir) / record["state"], map_location=device, weights_only=True)
        model.load_state_dict(state)
        eval_models.append(model)
    probs = _ensemble(pool_logits, config.temperature)
    unlabeled = subset.unlabeled.to(probs.device)
    if config.align and len(unlabeled):
        # Distribution alignment: the pool is stratified, so its class mix is even.
        mix = probs[unlabeled].mean(0)
        probs = probs / mix * (1.0 / probs.shape[1])
        probs = probs / probs.sum(dim=1, keepdim=True)
    hidden = subset.hidden.to(probs.device)

    def ensemble_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
        views = [_logits(m, images, splits, mirror) for m, mirror in zip(eval_models, mirrors, strict=True)]
        return float((_ensemble(views, 1.0).argmax(1) == labels).float().mean())

    target_accuracy = (
        float((probs[unlabeled].argmax(1) == hidden[unlabeled]).float().mean()) if len(unlabeled) else 1.0
    )
    return Teachers(
        probs=probs,
        members=members,
        val_accuracy=ensemble_accuracy(splits.val_images, splits.val_labels),
        test_accuracy=ensemble_accuracy(splits.test_images, splits.test_labels),
        target_accuracy=target_accuracy,
    )
