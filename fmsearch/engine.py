"""The one train/evaluate core: `fit` trains a configuration, `evaluate` scores a model.

Data stays resident on the device as uint8; batches are gathered there with one index tensor per
epoch, so the loop has no per-sample Python, no per-batch host->device copy and no per-batch
`.item()`. Epoch-end hooks see (epoch, metrics) and may stop training: early stopping is one, the
Optuna pruning hook (built by study.py) is another. This module knows nothing of Optuna.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fmsearch.data import Splits
from fmsearch.errors import ConfigError, FmsearchError
from fmsearch.models import ARCHITECTURES, build_model
from fmsearch.params import check, param, parameters
from fmsearch.semi import (
    HIDDEN,
    LabeledSubset,
    SemiBatchSampler,
    make_objective,
    pseudo_label_accuracy,
    select_labeled,
    weak_augment,
)

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "step", "cosine")
UNLABELED = ("skip", "pseudo", "distill", "vat")
MONITORS = ("val_loss", "val_accuracy")
FINITE_CHECK_EVERY = 16  # steps between divergence checks: each one is a host-device sync


@dataclass(frozen=True)
class TrainConfig:
    """One training configuration. Each field declares its parameter once (params.param): its type,
    default, valid values and help. Study files, `fmsearch train`'s flags and this check derive from it.
    """

    arch: str = param("plain", "architecture", choices=tuple(sorted(ARCHITECTURES)))
    lr: float = param(1e-3, "learning rate", low=0.0, low_open=True)
    dropout: float = param(
        0.25, "dropout probability before the last layer", low=0.0, high=1.0, high_open=True
    )
    epochs: int = param(10, "most epochs; early stopping or pruning may end sooner", low=1, study=False)
    batch_size: int = param(64, "images per batch", low=1, study=False)
    optimizer: str = param("adam", "adam, or sgd with momentum 0.9", choices=OPTIMIZERS)
    schedule: str = param(
        "none", "lr schedule: none, step (lr/10 after epochs 3 and 7), cosine", choices=SCHEDULES
    )
    weight_decay: float = param(0.0, "L2 penalty the optimizer adds to the gradient", low=0.0)
    patience: int | None = param(
        3, "early-stopping patience, epochs without a better monitored value", low=1, study=False
    )
    monitor: str = param("val_loss", "picks the best epoch and drives early stopping", choices=MONITORS)
    seed: int = param(0, "model init, batch order, augmentation, labeled subset", low=0, high=2**32 - 1)
    labeled_fraction: float = param(
        1.0, "share of the training pool that keeps its labels", low=0.0, low_open=True, high=1.0
    )
    labeled_count: int | None = param(None, "labeled images; overrides labeled_fraction", low=1)
    unlabeled: str = param("skip", "what an unlabeled batch does", choices=UNLABELED, semi=True)
    tau: float = param(
        0.95, "pseudo: confidence a pseudo-label needs", low=0.0, high=1.0, objectives=("pseudo",)
    )
    lambda_u: float = param(
        1.0, "weight of the unlabeled loss", low=0.0, objectives=("pseudo", "distill", "vat")
    )
    debias: bool = param(
        True,
        "pseudo: logit-adjust the unlabeled loss by the pseudo-labels' class mix",
        objectives=("pseudo",),
    )
    warmup_epochs: int = param(
        0, "pseudo: labeled-only epochs before unlabeled batches count", low=0, objectives=("pseudo",)
    )
    teachers: int = param(
        5, "distill: labels-only teachers, each on its own seed", low=1, objectives=("distill",)
    )
    teacher_epochs: int = param(30, "distill: most epochs of each teacher", low=1, objectives=("distill",))
    temperature: float = param(
        1.0, "distill: softmax temperature of the targets", low=0.0, low_open=True, objectives=("distill",)
    )
    tta: bool = param(
        True,
        "distill: average each flip-trained teacher over the image and its mirror",
        objectives=("distill",),
    )
    align: bool = param(
        True, "distill: rescale the targets to the pool's even class mix", objectives=("distill",)
    )
    vat_eps: float = param(
        4.0,  # the small texture task's best: 2 lost to skip with entropy minimisation (test_semi)
        "vat: L2 size of the perturbation, [0, 1] pixel units",
        low=0.0,
        low_open=True,
        objectives=("vat",),
    )
    vat_xi: float = param(
        0.1, "vat: finite-difference step of the power iteration", low=0.0, low_open=True, objectives=("vat",)
    )
    entropy_weight: float = param(1.0, "vat: weight of entropy minimisation", low=0.0, objectives=("vat",))
    augment: bool = param(False, "weak shift/flip augmentation of labeled batches")
    nesterov: bool = param(False, "sgd: Nesterov momentum (FixMatch's optimizer)")
    ema: float = param(
        0.0,
        "decay per step of a moving average of the weights, scored each epoch; 0: none",
        low=0.0,
        high=1.0,
        high_open=True,
    )
    amp: bool = param(False, "bf16 autocast")
    channels_last: bool = param(False, "channels_last memory format for the model and its inputs")
    compile: bool = param(False, "torch.compile the model")

    def __post_init__(self) -> None:
        check(self)

    def objective_settings(self) -> dict[str, Any]:
        """The fields that the chosen `unlabeled` objective reads: its constructor's keyword arguments."""
        return {
            p.name: getattr(self, p.name)
            for p in parameters(TrainConfig).values()
            if self.unlabeled in p.objectives
        }


class DivergenceError(FmsearchError):
    """The training loss became NaN or inf."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"loss became NaN or inf in epoch {epoch} near step {step}: lower the learning rate")
        self.epoch = epoch
        self.step = step


def resolve_device(name: str | None = None) -> torch.device:
    """CUDA, then MPS, then CPU, unless `name` ('cpu', 'cuda', 'cuda:1', 'mps') says otherwise."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available: use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("device 'mps' was asked for but MPS is not available: use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Batch:
    indices: torch.Tensor  # int64 pool indices on the device
    images: torch.Tensor | None  # uint8 (B, 28, 28); None for a batch nobody will read
    targets: torch.Tensor | None  # int64 (B,); None for unlabeled batches
    labeled: bool


class DeviceLoader:
    """Iterates a batch sampler over device-resident tensors.

    Each epoch the sampler's index tensor goes to the device in one copy; each batch is then a slice
    of it and a gather. With gather_unlabeled False, unlabeled batches carry no images.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        batch_sampler: SemiBatchSampler,
        gather_unlabeled: bool = True,
    ):
        self.images = images
        self.targets = targets
        self.batch_sampler = batch_sampler
        self.gather_unlabeled = gather_unlabeled

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        flat, sizes, kinds = self.batch_sampler.next_epoch()
        if not sizes:
            return
        flat = flat.to(self.images.device, non_blocking=True)
        for indices, labeled in zip(flat.split(sizes), kinds, strict=True):
            if labeled:
                yield Batch(indices, self.images[indices], self.targets[indices], True)
            elif self.gather_unlabeled:
                yield Batch(indices, self.images[indices], None, False)
            else:
                yield Batch(indices, None, None, False)


EpochHook = Callable[[int, dict], "str | None"]  # returns a stop reason, or None to go on


def improves(monitor: str, value: float, best: float | None) -> bool:
    """Whether `value` of `monitor` beats `best` (lower loss, higher accuracy)."""
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


class EarlyStopping:
    """Stops after `patience` epochs without a better monitored validation value.

    Epochs before `from_epoch` are ignored: a pseudo-label run counts patience from the end of its
    labeled-only warm-up.
    """

    def __init__(self, patience: int, monitor: str = "val_loss", from_epoch: int = 1):
        self.patience = patience
        self.monitor = monitor
        self.from_epoch = from_epoch
        self.best: float | None = None
        self.waited = 0

    def __call__(self, epoch: int, metrics: dict) -> str | None:
        if epoch < self.from_epoch:
            return None
        if improves(self.monitor, metrics[self.monitor], self.best):
            self.best = metrics[self.monitor]
            self.waited = 0
            return None
        self.waited += 1
        return "early-stopped" if self.waited >= self.patience else None


class Progress(Protocol):
    def epoch_start(self, epoch: int, steps: int) -> None: ...
    def step(self) -> None: ...


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy, nats per image
    accuracy: float  # fraction correct
    predictions: torch.Tensor  # int64 (N,) on the CPU, for a confusion matrix


@dataclass
class FitResult:
    model: nn.Module  # holds the best-epoch weights
    history: list[dict] = field(default_factory=list)  # one dict of floats per epoch
    best_epoch: int = 0  # 1-based; the best value of the config's monitor
    stop_reason: str = "max-epochs"  # max-epochs, early-stopped or pruned
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)  # CPU copy of best weights
    seconds: float = 0.0  # wall time of the whole fit
    labeled_count: int = 0
    best_by: dict[str, tuple[int, dict]] = field(default_factory=dict)  # monitor -> (epoch, CPU weights)
    ema_model: nn.Module | None = None  # the moving average of the weights at the last epoch, with ema > 0

    @property
    def best(self) -> dict:
        return self.history[self.best_epoch - 1]

    def record(self, epoch: int, metrics: dict, model: nn.Module) -> None:
        """Keep the epoch's metrics, and its weights where it is the best yet by either monitor."""
        self.history.append(metrics)
        for monitor in MONITORS:
            best = self.best_by.get(monitor)
            if improves(
                monitor, metrics[monitor], None if best is None else self.history[best[0] - 1][monitor]
            ):
                self.best_by[monitor] = (
                    epoch,
                    {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                )


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 2048,
    amp: bool = False,
) -> Evaluation:
    """Score `model` on uint8 images and labels already on its device."""
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    predictions = torch.empty(len(labels), dtype=torch.long, device=device)
    with torch.inference_mode(), _autocast(device, amp):
        for start in range(0, len(labels), batch_size):
            logits = model(normalize(images[start : start + batch_size])).float()
            target = labels[start : start + batch_size]
            loss_sum += F.cross_entropy(logits, target, reduction="sum")
            predictions[start : start + batch_size] = logits.argmax(dim=1)
    correct = (predictions == labels).sum()
    loss, correct = torch.stack([loss_sum, correct.float()]).tolist()  # one sync
    return Evaluation(loss / len(labels), correct / len(labels), predictions.cpu())


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=0.9,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    if config.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 7], gamma=0.1)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


def make_subset(config: TrainConfig, splits: Splits) -> LabeledSubset:
    """The labeled subset a config asks for, picked by its seed."""
    if config.labeled_count is not None:
        return select_labeled(splits.train_labels, count=config.labeled_count, seed=config.seed)
    return select_labeled(splits.train_labels, fraction=config.labeled_fraction, seed=config.seed)


class _Training:
    """What one fit trains with: the model, its optimizer and schedule, the loader and the objective."""

    def __init__(self, config: TrainConfig, splits: Splits, subset: LabeledSubset, teacher_probs):
        self.config, self.splits = config, splits
        self.device = device = splits.train_images.device
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.objective = make_objective(config, teacher_probs, splits.std)
        targets = subset.targets.to(device)
        self.hidden = subset.hidden.to(device)  # read only after each epoch, for pseudo-label accuracy
        self.channels_last = config.channels_last
        self.model = build_model(config.arch, config.dropout).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model = torch.compile(self.model) if config.compile else self.model
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False) if config.ema > 0 else None
        self.optimizer = _optimizer(config, self.model)
        self.scheduler = _scheduler(config, self.optimizer)
        self.sampler = SemiBatchSampler(subset.labeled, subset.unlabeled, config.batch_size, seed=config.seed)
        self.loader = DeviceLoader(splits.train_images, targets, self.sampler)
        self.subset = subset
        self.pseudo_record = torch.full_like(targets, HIDDEN)
        # A combined step averages the unlabeled losses since the last labeled batch.
        self.unlabeled_per_step = self.sampler.unlabeled_batches / max(self.sampler.labeled_batches, 1)
        self.step = 0

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 28, 28) from the store, or float (B, 1, 28, 28) in [0, 1] after augmentation."""
        s = self.splits
        x = s.normalize(images) if images.dtype == torch.uint8 else (images - s.mean) / s.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def warmup_epochs(self) -> int:
        """Labeled-only epochs before unlabeled batches count (pseudo-labels only)."""
        return self.objective.warmup_epochs

    def uses_unlabeled(self, epoch: int) -> bool:
        return self.objective.gathers_images and epoch > self.warmup_epochs

    def train_epoch(self, epoch: int, progress: Progress | None) -> dict[str, float]:
        """One pass over the pool; the loss and accuracy sums stay on the device until its end."""
        config, device, objective = self.config, self.device, self.objective
        use_unlabeled = self.uses_unlabeled(epoch)
        if use_unlabeled and epoch == self.warmup_epochs + 1:
            objective.start(self.model, self.splits.train_images, self.subset.unlabeled, self.normalize)
        self.loader.gather_unlabeled = use_unlabeled
        if progress is not None:
            unlabeled_steps = self.sampler.unlabeled_batches if use_unlabeled else 0
            progress.epoch_start(epoch, self.sampler.labeled_batches + unlabeled_steps)
        self.train_model.train()
        self.pseudo_record.fill_(HIDDEN)
        sums = torch.zeros(3, device=device)  # labeled loss, labeled correct, unlabeled loss
        labeled_seen = unlabeled_seen = 0
        started = time.perf_counter()
        for batch in self.loader:
            if batch.images is None:
                continue
            with _autocast(device, config.amp):
                if batch.labeled:
                    pixels = batch.images
                    if config.augment:
                        pixels = weak_augment(pixels.unsqueeze(1).float() / 255.0, self.generator)
                    logits = self.train_model(self.normalize(pixels)).float()
                    loss = F.cross_entropy(logits, batch.targets)
                    sums[0] += loss.detach() * len(batch.indices)
                    sums[1] += (logits.argmax(dim=1) == batch.targets).sum()
                    labeled_seen += len(batch.indices)
                else:
                    outcome = objective(
                        self.train_model, batch.indices, batch.images, self.normalize, self.generator
                    )
                    loss = outcome.loss if objective.steps_alone else outcome.loss / self.unlabeled_per_step
                    sums[2] += outcome.loss.detach() * len(batch.indices)
                    if outcome.pseudo_labels is not None:
                        self.pseudo_record[batch.indices] = outcome.pseudo_labels
                    unlabeled_seen += len(batch.indices)
            loss.backward()
            # Pseudo and vat add their gradients to the next labeled step (FixMatch's L_s + lambda_u L_u):
            # with a step of their own, Adam's equal-sized steps let pseudo-labels outvote the labels.
            if batch.labeled or objective.steps_alone:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema_model is not None:
                    ema, live = list(self.ema_model.parameters()), list(self.model.parameters())
                    torch._foreach_lerp_(ema, live, 1.0 - config.ema)
            self.step += 1
            if progress is not None:
                progress.step()
            if self.step % FINITE_CHECK_EVERY == 0 and not torch.isfinite(sums).all():  # host-device sync
                raise DivergenceError(epoch, self.step)
        if self.scheduler is not None:
            self.scheduler.step()
        _sync(device)
        train_seconds = time.perf_counter() - started
        labeled_loss_sum, correct, unlabeled_loss_sum = sums.tolist()  # the epoch's one sync
        if not all(map(math.isfinite, (labeled_loss_sum, unlabeled_loss_sum))):
            raise DivergenceError(epoch, self.step)
        metrics = {
            "epoch": epoch,
            "train_loss": labeled_loss_sum / max(labeled_seen, 1),
            "train_accuracy": correct / max(labeled_seen, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_seconds": train_seconds,
            "images_per_second": (labeled_seen + unlabeled_seen) / train_seconds,
        }
        if objective.gathers_images:
            pseudo_accuracy, kept = pseudo_label_accuracy(self.pseudo_record, self.hidden)
            metrics["unlabeled_loss"] = unlabeled_loss_sum / max(unlabeled_seen, 1)
            metrics["mask_rate"] = kept / unlabeled_seen if unlabeled_seen else 0.0
            metrics["pseudo_accuracy"] = pseudo_accuracy
        return metrics

    def validate(self, epoch: int) -> dict[str, float]:
        s, amp = self.splits, self.config.amp
        val = evaluate(self.model, s.val_images, s.val_labels, self.normalize, amp=amp)
        if not math.isfinite(val.loss):
            raise DivergenceError(epoch, self.step)
        metrics = {"val_loss": val.loss, "val_accuracy": val.accuracy}
        if self.ema_model is not None:
            ema = evaluate(self.ema_model, s.val_images, s.val_labels, self.normalize, amp=amp)
            metrics |= {"ema_val_loss": ema.loss, "ema_val_accuracy": ema.accuracy}
        return metrics


def fit(
    config: TrainConfig,
    splits: Splits,
    *,
    subset: LabeledSubset | None = None,
    teacher_probs: torch.Tensor | None = None,
    hooks: Sequence[EpochHook] = (),
    progress: Progress | None = None,
) -> FitResult:
    """Train one configuration; return its history and the best-epoch model by `config.monitor`.

    Training reads labels only through `subset.targets`, where unlabeled samples are HIDDEN.
    `teacher_probs` (N, C) are the distill objective's fixed targets for every pool image.
    Raises DivergenceError on a NaN or inf loss.
    """
    started = time.perf_counter()
    subset = subset if subset is not None else make_subset(config, splits)
    run = _Training(config, splits, subset, teacher_probs)
    stoppers: list[EpochHook] = list(hooks)
    if config.patience is not None:
        stoppers.append(EarlyStopping(config.patience, config.monitor, from_epoch=run.warmup_epochs + 1))
    result = FitResult(model=run.model, labeled_count=len(subset.labeled), ema_model=run.ema_model)
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        metrics = run.train_epoch(epoch, progress)
        metrics |= run.validate(epoch)
        metrics["epoch_seconds"] = time.perf_counter() - epoch_started
        result.record(epoch, metrics, run.model)
        reasons = [reason for hook in stoppers if (reason := hook(epoch, metrics))]
        if reasons:
            result.stop_reason = reasons[0]
            break
    result.best_epoch, result.best_state = result.best_by[config.monitor]
    run.model.load_state_dict(result.best_state)
    result.seconds = time.perf_counter() - started
    return result


def recall(evaluation: Evaluation, labels: torch.Tensor) -> list[float]:
    """Per-class recall (fraction of each class predicted right), class order."""
    truth = labels.cpu()
    right = evaluation.predictions == truth
    counts = torch.bincount(truth, minlength=int(truth.max()) + 1).clamp(min=1)
    return (torch.bincount(truth, weights=right.float(), minlength=len(counts)) / counts).tolist()


def score_by_monitor(result: FitResult, splits: Splits, config: TrainConfig) -> dict[str, dict]:
    """Test accuracy of the best epoch by each monitor and of the final moving average, to compare rules."""
    model = build_model(config.arch, config.dropout).to(splits.test_images.device)
    scores = {}
    for monitor, (epoch, state) in result.best_by.items():
        model.load_state_dict(state)
        test = evaluate(model, splits.test_images, splits.test_labels, splits.normalize)
        scores[monitor] = {
            "epoch": epoch,
            "val_accuracy": result.history[epoch - 1]["val_accuracy"],
            "test_accuracy": test.accuracy,
            "test_recall": recall(test, splits.test_labels),
        }
    if result.ema_model is not None:
        test = evaluate(result.ema_model, splits.test_images, splits.test_labels, splits.normalize)
        scores["ema_last"] = {
            "epoch": len(result.history),
            "val_accuracy": result.history[-1]["ema_val_accuracy"],
            "test_accuracy": test.accuracy,
            "test_recall": recall(test, splits.test_labels),
        }
    return scores
