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
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fmsearch.config import MONITORS, TrainConfig
from fmsearch.data import CLASSES, Splits
from fmsearch.errors import ConfigError, FmsearchError
from fmsearch.models import build_model
from fmsearch.semi import (
    HIDDEN,
    LabeledSubset,
    SemiBatchSampler,
    make_objective,
    pseudo_label_accuracy,
    select_labeled,
    weak_augment,
)
from fmsearch.speed import Execution, settle, sync
from fmsearch.storage import AT_CHANCE, EARLY_STOPPED, MAX_EPOCHS

# Steps between divergence checks. On a GPU each check is a host-device sync; on the CPU it costs nothing
# measurable (a 10,000-image epoch: 5.9 s checking every step, 6.7 s every 16th; AMD EPYC AVX2, 2026-12-02).
FINITE_CHECK_EVERY = 16


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
    An epoch of 50,000 images, normalized: 0.14 s, against 14.3 s for the assignment's DataLoader with
    ToTensor and Normalize, 100x (AMD EPYC AVX2, 2 cores, 2026-12-02).
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
        return EARLY_STOPPED if self.waited >= self.patience else None


class AtChance:
    """Stops a run whose network is dead: for its first `epochs` epochs (after any warm-up) the
    validation loss stayed within 1% of log(classes), what uniform outputs score, and the accuracy
    at chance. Such a run (too high a learning rate) never recovers, and would otherwise run every
    epoch a patient schedule allows; a run that learns at all, however slowly, leaves that band."""

    def __init__(self, classes: int, epochs: int = 5, from_epoch: int = 1):
        self.uniform_loss = math.log(classes)
        self.chance = 1.0 / classes
        self.epochs = epochs
        self.from_epoch = from_epoch
        self.alive = False

    def __call__(self, epoch: int, metrics: dict) -> str | None:
        if epoch < self.from_epoch or self.alive:
            return None
        uniform = abs(metrics["val_loss"] - self.uniform_loss) <= 0.01 * self.uniform_loss
        self.alive = not (uniform and metrics["val_accuracy"] <= 1.2 * self.chance)
        return AT_CHANCE if not self.alive and epoch - self.from_epoch + 1 >= self.epochs else None


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
    stop_reason: str = MAX_EPOCHS  # or EARLY_STOPPED, PRUNED (storage's stop reasons)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)  # CPU copy of best weights
    seconds: float = 0.0  # wall time of the whole fit
    labeled_images: int = 0  # how many the run trained on (config.labeled_count asks for a number)
    best_by: dict[str, tuple[int, dict]] = field(default_factory=dict)  # monitor -> (epoch, CPU weights)
    ema_model: nn.Module | None = None  # the moving average of the weights at the last epoch, with ema > 0
    execution: Execution | None = None  # how it ran: the settings chosen for this machine, or forced

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


def logits_of(
    model: nn.Module,
    images: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    execution: Execution | None = None,
) -> torch.Tensor:
    """(N, C) float32 logits of uint8 images on the model's device, in batches as `execution` runs
    them (default: this machine's choice): its batch size, memory format, precision and threads."""
    run = execution or settle(TrainConfig(), images.device)
    model = run.prepare(model).eval()
    size = run.eval_batch_size
    with run.threaded(), torch.inference_mode(), run.autocast():
        batches = [
            model(run.layout(normalize(images[s : s + size]))).float() for s in range(0, len(images), size)
        ]
    return torch.cat(batches)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    execution: Execution | None = None,
) -> Evaluation:
    """Score `model` on uint8 images and labels already on its device (see logits_of)."""
    logits = logits_of(model, images, normalize, execution)
    predictions = logits.argmax(dim=1)
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    loss, correct = torch.stack([loss_sum, (predictions == labels).sum().float()]).tolist()  # one sync
    return Evaluation(loss / len(labels), correct / len(labels), predictions.cpu())


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # One fused kernel per step, where torch's CPU default loops over the tensors in Python: training
    # steps x1.07 at batch 64 in bf16 + channels_last on 2 threads, x1.27 at batch 10 in float32 on one
    # (median of 4 paired timings, both CNNs, 2-core Intel Xeon with AMX, 2026-12-03). Same update rule.
    fused = {"fused": True} if next(model.parameters()).device.type in ("cpu", "cuda") else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=0.9,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            **fused,
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)


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

    def __init__(
        self,
        config: TrainConfig,
        splits: Splits,
        subset: LabeledSubset,
        teacher_probs,
        execution: Execution,
        initial_state: dict[str, torch.Tensor] | None = None,
    ):
        self.config, self.splits, self.execution = config, splits, execution
        self.device = device = splits.train_images.device
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.objective = make_objective(config, teacher_probs, splits.std)
        targets = subset.targets.to(device)
        self.hidden = subset.hidden.to(device)  # read only after each epoch, for pseudo-label accuracy
        self.model = execution.prepare(build_model(config.arch, config.dropout).to(device))
        if initial_state is not None:  # a warm start: the run begins from these weights
            self.model.load_state_dict(initial_state)
        self.train_model = torch.compile(self.model) if execution.compile else self.model
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False) if config.ema > 0 else None
        if self.ema_model is not None:  # the pairs each step averages, listed once
            self.ema_pairs = list(self.ema_model.parameters()), list(self.model.parameters())
        self.optimizer = _optimizer(config, self.model)
        self.scheduler = _scheduler(config, self.optimizer)
        # The objective's batches draw from the unlabeled images, or from the labeled ones (an ablation).
        drawn = subset.labeled if self.objective.draws == "labeled" else subset.unlabeled
        self.sampler = SemiBatchSampler(subset.labeled, drawn, config.batch_size, seed=config.seed)
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
        return self.execution.layout(x)

    @property
    def warmup_epochs(self) -> int:
        """Labeled-only epochs before unlabeled batches count (pseudo-labels only)."""
        return self.objective.warmup_epochs

    def uses_unlabeled(self, epoch: int) -> bool:
        return self.objective.gathers_images and epoch > self.warmup_epochs

    def train_epoch(self, epoch: int, progress: Progress | None) -> dict[str, float]:
        """One pass over the pool; the loss and accuracy sums stay on the device until its end."""
        objective = self.objective
        use_unlabeled = self.uses_unlabeled(epoch)
        if use_unlabeled and epoch == self.warmup_epochs + 1:
            with self.execution.threaded(), self.execution.autocast():
                objective.start(self.model, self.splits.train_images, self.subset.unlabeled, self.normalize)
        # Skipping the gather saves 65 ms of the loader's 84 ms in a 10%-label epoch (AMD EPYC, 2026-12-02).
        self.loader.gather_unlabeled = use_unlabeled
        if progress is not None:
            unlabeled_steps = self.sampler.unlabeled_batches if use_unlabeled else 0
            progress.epoch_start(epoch, self.sampler.labeled_batches + unlabeled_steps)
        self.train_model.train()
        self.pseudo_record.fill_(HIDDEN)
        sums = torch.zeros(3, device=self.device)  # labeled loss, labeled correct, unlabeled loss
        seen = {True: 0, False: 0}  # images, by whether their batch was labeled
        started = time.perf_counter()
        for batch in self.loader:
            if batch.images is None:
                continue
            self.train_step(batch, sums)
            seen[batch.labeled] += len(batch.indices)
            if progress is not None:
                progress.step()
            if self.step % FINITE_CHECK_EVERY == 0 and not torch.isfinite(sums).all():  # host-device sync
                raise DivergenceError(epoch, self.step)
        if self.scheduler is not None:
            self.scheduler.step()
        sync(self.device)
        train_seconds = time.perf_counter() - started
        labeled_seen, unlabeled_seen = seen[True], seen[False]
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

    def train_step(self, batch: Batch, sums: torch.Tensor) -> None:
        """One batch: forward, backward and, where it steps, the optimizer; `sums` gains its losses."""
        config, objective = self.config, self.objective
        with self.execution.autocast():
            if batch.labeled:
                pixels = batch.images
                if config.augment:
                    pixels = weak_augment(pixels.unsqueeze(1).float() / 255.0, self.generator)
                logits = self.train_model(self.normalize(pixels)).float()
                loss = F.cross_entropy(logits, batch.targets)
                sums[0] += loss.detach() * len(batch.indices)
                sums[1] += (logits.argmax(dim=1) == batch.targets).sum()
            else:
                outcome = objective(
                    self.train_model, batch.indices, batch.images, self.normalize, self.generator
                )
                loss = outcome.loss if objective.steps_alone else outcome.loss / self.unlabeled_per_step
                sums[2] += outcome.loss.detach() * len(batch.indices)
                if outcome.pseudo_labels is not None:
                    self.pseudo_record[batch.indices] = outcome.pseudo_labels
        loss.backward()
        # Pseudo and vat add their gradients to the next labeled step (FixMatch's L_s + lambda_u L_u):
        # with a step of their own, Adam's equal-sized steps let pseudo-labels outvote the labels.
        if batch.labeled or objective.steps_alone:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema_model is not None:
                with torch.no_grad():  # else the average records an autograd history of every step
                    torch._foreach_lerp_(*self.ema_pairs, 1.0 - config.ema)
        self.step += 1

    @property
    def kept_model(self) -> nn.Module:
        """The weights that are validated, picked and kept: the moving average's with keep_ema."""
        return self.ema_model if self.config.keep_ema else self.model

    def validate(self, epoch: int) -> dict[str, float]:
        s, run = self.splits, self.execution
        val = evaluate(self.model, s.val_images, s.val_labels, self.normalize, run)
        if not math.isfinite(val.loss):
            raise DivergenceError(epoch, self.step)
        if self.ema_model is None:
            return {"val_loss": val.loss, "val_accuracy": val.accuracy}
        ema = evaluate(self.ema_model, s.val_images, s.val_labels, self.normalize, run)
        # The kept weights are the monitored ones; the other set is a side record under its prefix.
        kept, side, prefix = (ema, val, "live_") if self.config.keep_ema else (val, ema, "ema_")
        return {
            "val_loss": kept.loss,
            "val_accuracy": kept.accuracy,
            f"{prefix}val_loss": side.loss,
            f"{prefix}val_accuracy": side.accuracy,
        }


def fit(
    config: TrainConfig,
    splits: Splits,
    *,
    subset: LabeledSubset | None = None,
    teacher_probs: torch.Tensor | None = None,
    hooks: Sequence[EpochHook] = (),
    progress: Progress | None = None,
    execution: Execution | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> FitResult:
    """Train one configuration; return its history and the best-epoch model by `config.monitor`.

    Training reads labels only through `subset.targets`, where unlabeled samples are HIDDEN.
    `teacher_probs` (N, C) are the distill objective's fixed targets for every pool image.
    `execution` is how it runs (default: this machine's choice with what `config` forces).
    `initial_state`: weights to start from (a warm start), else a fresh initialisation.
    With `config.keep_ema`, the moving average of the weights is what is validated, picked and returned.
    Raises DivergenceError on a NaN or inf loss.
    """
    started = time.perf_counter()
    execution = execution or settle(config, splits.train_images.device)
    subset = subset if subset is not None else make_subset(config, splits)
    run = _Training(config, splits, subset, teacher_probs, execution, initial_state)
    stoppers: list[EpochHook] = list(hooks)
    if config.patience is not None:
        stoppers.append(EarlyStopping(config.patience, config.monitor, from_epoch=run.warmup_epochs + 1))
    stoppers.append(AtChance(len(CLASSES), from_epoch=run.warmup_epochs + 1))
    kept = run.kept_model
    result = FitResult(
        model=kept,
        labeled_images=len(subset.labeled),
        ema_model=None if config.keep_ema else run.ema_model,
        execution=execution,
    )
    with execution.threaded():
        for epoch in range(1, config.epochs + 1):
            epoch_started = time.perf_counter()
            metrics = run.train_epoch(epoch, progress)
            metrics |= run.validate(epoch)
            metrics["epoch_seconds"] = time.perf_counter() - epoch_started
            result.record(epoch, metrics, kept)
            reasons = [reason for hook in stoppers if (reason := hook(epoch, metrics))]
            if reasons:
                result.stop_reason = reasons[0]
                break
    result.best_epoch, result.best_state = result.best_by[config.monitor]
    kept.load_state_dict(result.best_state)
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class EpochCost:
    """Measured seconds of one epoch of a config, as `fit` runs it on this machine."""

    labeled: float  # all the labeled batches
    unlabeled: float  # all the unlabeled batches (0 when the objective skips them)
    validation: float  # the validation pass

    @property
    def seconds(self) -> float:
        return self.labeled + self.unlabeled + self.validation


def time_epoch(
    config: TrainConfig, splits: Splits, execution: Execution | None = None, steps: int = 8
) -> EpochCost:
    """Time `steps` batches of each kind through fit's own training step (after 2 warm-up batches of
    each) and scale them to the epoch's count; time the validation pass whole. Trains nothing that is kept.
    """
    execution = execution or settle(config, splits.train_images.device)
    subset = make_subset(config, splits)
    probs = None
    if config.unlabeled == "distill":  # any targets will do for timing
        probs = torch.full((len(splits.train_labels), 10), 0.1, device=splits.train_images.device)
    run = _Training(config, splits, subset, probs, execution)
    run.loader.gather_unlabeled = run.objective.gathers_images
    batches: dict[bool, list[Batch]] = {True: [], False: []}
    for batch in run.loader:
        if batch.images is not None and len(batches[batch.labeled]) < steps + 2:
            batches[batch.labeled].append(batch)
    counts = {True: run.sampler.labeled_batches, False: run.sampler.unlabeled_batches}
    seconds = {True: 0.0, False: 0.0}
    sums = torch.zeros(3, device=run.device)
    with execution.threaded():
        run.train_model.train()
        for labeled, kind in batches.items():
            warm, timed = (kind[:2], kind[2:]) if len(kind) > 2 else ([], kind)
            for batch in warm:
                run.train_step(batch, sums)
            sync(run.device)
            started = time.perf_counter()
            for batch in timed:
                run.train_step(batch, sums)
            sync(run.device)
            if timed:
                seconds[labeled] = (time.perf_counter() - started) / len(timed) * counts[labeled]
        started = time.perf_counter()
        run.validate(1)
        validation = time.perf_counter() - started
    return EpochCost(seconds[True], seconds[False], validation)


def confusion(evaluation: Evaluation, labels: torch.Tensor) -> list[list[int]]:
    """counts[true class][predicted class], over every class of the data set."""
    classes = len(CLASSES)
    pairs = labels.cpu() * classes + evaluation.predictions
    return torch.bincount(pairs, minlength=classes * classes).view(classes, classes).tolist()


def recall(evaluation: Evaluation, labels: torch.Tensor) -> list[float]:
    """Per-class recall (fraction of each class predicted right), class order."""
    truth = labels.cpu()
    right = evaluation.predictions == truth
    counts = torch.bincount(truth, minlength=int(truth.max()) + 1).clamp(min=1)
    return (torch.bincount(truth, weights=right.float(), minlength=len(counts)) / counts).tolist()


def score_by_monitor(result: FitResult, splits: Splits, config: TrainConfig) -> dict[str, dict]:
    """Test loss and accuracy of the best epoch by each monitor and of the final moving average, to
    compare rules. An epoch that is best by both monitors is scored once."""
    model = build_model(config.arch, config.dropout).to(splits.test_images.device)
    by_epoch: dict[int, Evaluation] = {}
    scores = {}
    for monitor, (epoch, state) in result.best_by.items():
        if epoch not in by_epoch:
            model.load_state_dict(state)
            by_epoch[epoch] = evaluate(
                model, splits.test_images, splits.test_labels, splits.normalize, result.execution
            )
        scores[monitor] = _score(epoch, result.history[epoch - 1]["val_accuracy"], by_epoch[epoch], splits)
    if result.ema_model is not None:
        test = evaluate(
            result.ema_model, splits.test_images, splits.test_labels, splits.normalize, result.execution
        )
        scores["ema_last"] = _score(len(result.history), result.history[-1]["ema_val_accuracy"], test, splits)
    return scores


def _score(epoch: int, val_accuracy: float, test: Evaluation, splits: Splits) -> dict:
    return {
        "epoch": epoch,
        "val_accuracy": val_accuracy,
        "test_loss": test.loss,
        "test_accuracy": test.accuracy,
        "test_recall": recall(test, splits.test_labels),
    }
