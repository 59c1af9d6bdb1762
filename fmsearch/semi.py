"""Semi-label training: the labeled subset, a homogeneous-batch sampler, and unlabeled objectives.

A labeled batch trains with cross-entropy. What an unlabeled batch does is an `UnlabeledObjective`:
`skip` (the assignment's baseline: nothing, not even a gather), `pseudo` (FixMatch-style
confidence-thresholded pseudo-labels, weak view -> strong view, batched on the device), `distill`
(soft targets from labels-only teachers, handed in as one fixed tensor) or `vat` (virtual
adversarial training with entropy minimisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Sampler, default_collate

from fmsearch.data import CLASSES
from fmsearch.errors import ConfigError

HIDDEN = -1  # the target of every unlabeled sample on the training path


@dataclass(frozen=True)
class LabeledSubset:
    """Which training-pool samples keep their labels.

    `targets` is what training sees: the true label for labeled samples, HIDDEN (-1) otherwise.
    `hidden` holds the true labels, for reporting (pseudo-label accuracy) only.
    """

    labeled: torch.Tensor  # int64 pool indices, sorted
    unlabeled: torch.Tensor  # int64 pool indices, sorted
    targets: torch.Tensor  # int64 (N,), HIDDEN where unlabeled
    hidden: torch.Tensor  # int64 (N,), the true labels


def labeled_count_for(pool_size: int, fraction: float | None, count: int | None) -> int:
    """The number of labeled samples asked for by a fraction (0, 1] or an absolute count."""
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of labeled fraction or labeled count")
    if count is None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"labeled fraction must be in (0, 1], got {fraction}")
        count = round(fraction * pool_size)
    if not 0 < count <= pool_size:
        raise ConfigError(
            f"labeled count must be in 1..{pool_size}, got {count}: lower it or use more of the pool"
        )
    return count


def select_labeled(
    labels: torch.Tensor,
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
) -> LabeledSubset:
    """Pick a stratified labeled subset of the pool (every class within one sample of its share).

    Deterministic for a seed; a fraction of 1.0 labels everything.
    """
    labels_cpu = labels.cpu()
    n = len(labels_cpu)
    count = labeled_count_for(n, fraction, count)
    everything = np.arange(n)
    if count == n:
        labeled, unlabeled = everything, everything[:0]
    else:
        n_classes = int(labels_cpu.max()) + 1
        if count < n_classes or n - count < n_classes:
            raise ConfigError(
                f"a stratified pick of {count} of {n} needs at least {n_classes} labeled and {n_classes} "
                "unlabeled samples: change the labeled count or fraction"
            )
        labeled, unlabeled = train_test_split(
            everything, train_size=count, stratify=labels_cpu.numpy(), random_state=seed
        )
    labeled_t = torch.from_numpy(np.sort(labeled)).long()
    unlabeled_t = torch.from_numpy(np.sort(unlabeled)).long()
    targets = labels_cpu.clone()
    targets[unlabeled_t] = HIDDEN
    return LabeledSubset(labeled_t, unlabeled_t, targets.to(labels.device), labels.clone())


class SemiBatchSampler(Sampler[list[int]]):
    """Batches of indices; every batch is all-labeled or all-unlabeled.

    Each epoch covers every labeled and every unlabeled index exactly once (the last short batch
    of each kind is dropped only with drop_last=True). Labeled batches are spread evenly among
    the unlabeled ones with a random phase. The order is reshuffled each epoch, deterministically
    from (seed, epoch); the epoch advances on every iteration, or is set with set_epoch().
    A full-label run is the case with no unlabeled indices.

    `next_epoch()` gives an epoch as one index tensor (what engine.DeviceLoader reads); iterating
    yields each batch as a list of ints, so the sampler also works as a DataLoader's batch_sampler.
    """

    def __init__(
        self,
        labeled_indices: Sequence[int] | torch.Tensor,
        unlabeled_indices: Sequence[int] | torch.Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.labeled = torch.as_tensor(labeled_indices, dtype=torch.long)
        self.unlabeled = torch.as_tensor(unlabeled_indices, dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _count(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def labeled_batches(self) -> int:
        return self._count(len(self.labeled))

    @property
    def unlabeled_batches(self) -> int:
        return self._count(len(self.unlabeled))

    def __len__(self) -> int:
        return self.labeled_batches + self.unlabeled_batches

    def _chunks(self, indices: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        # numpy's generator only draws the order (as it always has, so seeded runs keep their batches);
        # the indices themselves stay a tensor.
        order = indices[torch.from_numpy(rng.permutation(len(indices)))]
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        return order[:stop].split(self.batch_size) if stop else ()  # split() of nothing gives one empty batch

    def next_epoch(self) -> tuple[torch.Tensor, list[int], list[bool]]:
        """The next epoch: its indices in batch order as one int64 tensor, each batch's size, and
        whether each batch is labeled."""
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        labeled = self._chunks(self.labeled, rng)
        unlabeled = self._chunks(self.unlabeled, rng)
        total = len(labeled) + len(unlabeled)
        # Labeled batch k goes to slot floor((k + phase) * total / L): evenly spaced, all distinct.
        phase = rng.random()
        slots = {math.floor((k + phase) * total / len(labeled)): k for k in range(len(labeled))}
        next_unlabeled = iter(unlabeled)
        batches = [labeled[slots[p]] if p in slots else next(next_unlabeled) for p in range(total)]
        flat = torch.cat(batches) if batches else self.labeled[:0]
        return flat, [len(b) for b in batches], [p in slots for p in range(total)]

    def __iter__(self) -> Iterator[list[int]]:
        flat, sizes, _ = self.next_epoch()
        for batch in flat.split(sizes):
            yield batch.tolist()


def collate_marked(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """DataLoader collate_fn: (images, targets, is_labeled) for a homogeneous batch."""
    images, targets = default_collate(batch)
    return images, targets, bool(targets[0] != HIDDEN)


def _translate(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `shift` pixels each way, zero-filled; (B, 1, H, W) in, same out."""
    b, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (2, b, 1), device=images.device, generator=generator)
    rows = torch.arange(h, device=images.device) + offsets[0]  # (B, H)
    cols = torch.arange(w, device=images.device) + offsets[1]  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 1, 1, 1, device=like.device, generator=generator)


def weak_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift by up to 2 px and flip left-right at random; pixels in [0, 1], (B, 1, 28, 28)."""
    shifted = _translate(images, 2, generator)
    flip = torch.rand(len(images), 1, 1, 1, device=images.device, generator=generator) < 0.5
    return torch.where(flip, shifted.flip(-1), shifted)


def strong_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Weak, then a random affine warp and a contrast and brightness change; (B, 1, 28, 28) in [0, 1].

    The warp rotates by up to 15 degrees, scales by 0.9 to 1.1 and shifts by up to 3 px, in one
    `grid_sample`. Contrast is scaled by 0.6 to 1.4 around the image mean and brightness moves by up
    to 0.15. There is no cutout: on Fashion-MNIST a black square is a hole, and a sneaker with holes
    is a sandal. With cutout, sandal recall fell from 0.97 to 0.83-0.93 within two epochs of
    pseudo-labels; with this view it stayed at 0.96-0.98.
    """
    x = weak_augment(images, generator)
    b = len(x)
    angle = _uniform(b, -math.radians(15.0), math.radians(15.0), x, generator).view(b)
    inverse_scale = 1.0 / _uniform(b, 0.9, 1.1, x, generator).view(b)
    shift = _uniform(2 * b, -6.0 / 28.0, 6.0 / 28.0, x, generator).view(b, 2)  # 3 px in [-1, 1] units
    cos, sin = torch.cos(angle) * inverse_scale, torch.sin(angle) * inverse_scale
    rows = torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)
    theta = torch.stack(rows, 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * _uniform(b, 0.6, 1.4, x, generator) + mean
    return (x + _uniform(b, -0.15, 0.15, x, generator)).clamp(0.0, 1.0)


@dataclass
class UnlabeledStep:
    """What one unlabeled batch produced; every tensor stays on the device."""

    loss: torch.Tensor  # scalar, already weighted; backpropagated by the engine
    pseudo_labels: torch.Tensor | None = None  # int64 (B,), HIDDEN where none; None: no labels made


class UnlabeledObjective:
    """What an unlabeled batch does. `gathers_images` False means the engine skips the batch.

    The engine calls `start` once, when unlabeled batches begin to count (after any warm-up), then
    the objective once per unlabeled batch with the batch's pool indices and uint8 images.
    With `steps_alone`, an unlabeled batch takes its own optimizer step; otherwise its gradient joins
    the next labeled batch's step.
    """

    gathers_images = True
    steps_alone = False
    warmup_epochs = 0  # labeled-only epochs before unlabeled batches count
    draws = "unlabeled"  # the images its batches come from; "labeled" for distill's ablation

    def start(self, model: nn.Module, pool: torch.Tensor, unlabeled: torch.Tensor, normalize) -> None:
        """Called before the first unlabeled batch; `pool` is every training image, uint8 (N, 28, 28)."""

    def __call__(
        self,
        model: nn.Module,
        indices: torch.Tensor,
        images: torch.Tensor,
        normalize,
        generator: torch.Generator,
    ) -> UnlabeledStep:
        raise NotImplementedError


class Skip(UnlabeledObjective):
    """The assignment's baseline: no gradient step, no gather."""

    gathers_images = False


class PseudoLabel(UnlabeledObjective):
    """FixMatch for homogeneous batches: pseudo-label a weak view, train the strong view.

    The weak view is predicted in eval mode (no dropout) without gradients; predictions whose
    confidence reaches `tau` become targets for the strong view, weighted by `lambda_u`.

    With `debias`, the strong view's logits are shifted by the log of the class mix of the
    confident pseudo-labels before the cross-entropy (logit adjustment, Menon et al. 2021). At
    tau 0.95 a labels-only plain CNN is confident on 4,245 unlabeled trousers but on 57 shirts, so
    plain cross-entropy on those labels teaches "never shirt": in one epoch of pseudo-labels shirt
    recall fell from 0.60 to 0.36, against 0.61 with the shift. The shift leaves the loss unchanged
    when the mix is even.
    The mix is counted from each unlabeled sample's latest prediction; `start` fills it with one
    pass over the pool, so it is right from the first unlabeled batch.
    """

    def __init__(self, tau: float, lambda_u: float, debias: bool = True, warmup_epochs: int = 0):
        self.tau = tau
        self.warmup_epochs = warmup_epochs
        self.lambda_u = lambda_u
        self.debias = debias
        self.status: torch.Tensor | None = None  # (N,) class predicted at >= tau, HIDDEN otherwise
        self.counts: torch.Tensor | None = None  # (C + 1,): [below tau, class 0, ..., class C-1]

    def start(self, model, pool, unlabeled, normalize):
        if not self.debias:
            return
        device = pool.device
        unlabeled = unlabeled.to(device)
        self.status = torch.full((len(pool),), HIDDEN, dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for chunk in unlabeled.split(4096):
                probs = torch.softmax(model(normalize(pool[chunk])).float(), dim=1)
                confidence, predicted = probs.max(dim=1)
                self.status[chunk] = torch.where(confidence >= self.tau, predicted, HIDDEN)
        model.train(was_training)
        self.counts = torch.zeros(len(CLASSES) + 1, device=device)  # [0]: unsure (HIDDEN), then each class
        self.counts.scatter_add_(0, self.status[unlabeled] + 1, torch.ones(len(unlabeled), device=device))

    def class_prior(self) -> torch.Tensor:
        """(C,) the class mix of the confident pseudo-labels, one pseudo-count per class."""
        kept = self.counts[1:] + 1.0
        return kept / kept.sum()

    def __call__(self, model, indices, images, normalize, generator):
        pixels = images.unsqueeze(1).float() / 255.0
        with torch.no_grad():
            model.eval()
            probs = torch.softmax(model(normalize(weak_augment(pixels, generator))).float(), dim=1)
            model.train()
        confidence, pseudo = probs.max(dim=1)
        mask = confidence >= self.tau
        labels = torch.where(mask, pseudo, HIDDEN)
        logits = model(normalize(strong_augment(pixels, generator))).float()
        if self.counts is not None:
            ones = torch.ones(len(indices), device=self.counts.device)
            self.counts.scatter_add_(0, self.status[indices] + 1, -ones)
            self.counts.scatter_add_(0, labels + 1, ones)
            self.status[indices] = labels
            logits = logits + self.class_prior().log()
        per_sample = F.cross_entropy(logits, pseudo, reduction="none")
        loss = self.lambda_u * (per_sample * mask).mean()
        return UnlabeledStep(loss, labels)


class Distill(UnlabeledObjective):
    """Offline distillation: an unlabeled batch's augmented view learns the teachers' fixed soft targets.

    `targets` (N, C) holds a probability vector for every pool image; only the unlabeled rows are
    read. The targets never move, so there is no confirmation loop. Each unlabeled batch takes its
    own step: the student learns the pool from the teachers as it would from labels. Noisy Student's
    noise on the student: a `strong` view, and `mixup` of images with their targets (Beta(a, a)).
    With `distill_on` "labeled", its batches are the labeled images instead, with their teachers'
    soft targets: the ablation that shows what the unlabeled images add to distillation.
    """

    steps_alone = True

    def __init__(
        self,
        targets: torch.Tensor,
        lambda_u: float,
        student_view: str = "weak",
        mixup: float = 0.0,
        distill_on: str = "unlabeled",
    ):
        self.targets = targets
        self.lambda_u = lambda_u
        self.student_view, self.mixup = student_view, mixup
        self.draws = distill_on
        self.augment = strong_augment if student_view == "strong" else weak_augment

    def __call__(self, model, indices, images, normalize, generator):
        pixels = self.augment(images.unsqueeze(1).float() / 255.0, generator)
        target = self.targets[indices]
        if self.mixup > 0:
            pixels, target = _mix(pixels, target, self.mixup, generator)
        log_probs = F.log_softmax(model(normalize(pixels)).float(), dim=1)
        loss = self.lambda_u * -(target * log_probs).sum(dim=1).mean()
        return UnlabeledStep(loss, self.targets[indices].argmax(dim=1))


def _mix(
    pixels: torch.Tensor, target: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """mixup (Zhang et al. 2018): each image and its target blended with another of the batch's by one
    Beta(alpha, alpha) weight per batch (torch's global generator draws it, seeded by the run as
    dropout's is; the pairing comes from the run's generator)."""
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(len(pixels), generator=generator, device=pixels.device)
    return weight * pixels + (1 - weight) * pixels[order], weight * target + (1 - weight) * target[order]


def _unit(d: torch.Tensor) -> torch.Tensor:
    return d / (d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)


class VirtualAdversarial(UnlabeledObjective):
    """VAT (Miyato et al. 2018) with entropy minimisation, one power iteration.

    The clean prediction and the power iteration run in eval mode (no dropout); the models have no
    batch norm, so no pass updates batch statistics. `eps` and `xi` are L2 sizes in [0, 1] pixel
    units, turned into normalized-input units by the pool's std. The loss is
    lambda_u * KL(p(x) || p(x + r_adv)) + entropy_weight * H(p(x)).
    """

    def __init__(
        self, vat_eps: float, vat_xi: float, lambda_u: float, entropy_weight: float, std: float = 1.0
    ):
        self.vat_eps, self.vat_xi = vat_eps, vat_xi
        self.eps, self.xi = vat_eps / std, vat_xi / std  # in normalized-input units
        self.lambda_u = lambda_u
        self.entropy_weight = entropy_weight

    def __call__(self, model, indices, images, normalize, generator):
        x = normalize(images)
        model.eval()
        with torch.no_grad():
            clean = F.softmax(model(x).float(), dim=1)
        d = _unit(torch.randn(x.shape, device=x.device, generator=generator)).requires_grad_(True)
        divergence = F.kl_div(
            F.log_softmax(model(x + self.xi * d).float(), dim=1), clean, reduction="batchmean"
        )
        (gradient,) = torch.autograd.grad(divergence, d)
        r_adv = self.eps * _unit(gradient)
        model.train()
        adversarial = F.log_softmax(model(x + r_adv).float(), dim=1)
        vat = F.kl_div(adversarial, clean, reduction="batchmean")
        loss = self.lambda_u * vat
        if self.entropy_weight > 0:
            log_p = F.log_softmax(model(x).float(), dim=1)
            loss = loss + self.entropy_weight * -(log_p.exp() * log_p).sum(dim=1).mean()
        return UnlabeledStep(loss)


def make_objective(config, teacher_probs: torch.Tensor | None = None, std: float = 1.0) -> UnlabeledObjective:
    """The unlabeled objective a TrainConfig names, built from the fields declared for it.

    distill also needs the teachers' (N, C) targets; vat the pool's pixel std, to size its steps.
    """
    settings = config.objective_settings()
    if config.unlabeled == "pseudo":
        return PseudoLabel(**settings)
    if config.unlabeled == "distill":
        if teacher_probs is None:
            raise ValueError(
                "unlabeled 'distill' needs the teachers' targets: build them with teachers.build"
            )
        return Distill(teacher_probs, **settings)
    if config.unlabeled == "vat":
        return VirtualAdversarial(**settings, std=std)
    return Skip(**settings)


def warmup_epochs(config) -> int:
    """Labeled-only epochs before `config`'s objective uses unlabeled batches (0 where it has none)."""
    return config.objective_settings().get("warmup_epochs", 0)


def pseudo_label_accuracy(record: torch.Tensor, hidden: torch.Tensor) -> tuple[float, float]:
    """After an epoch: (share of pseudo-labels that match the hidden truth, count kept).

    `record` holds each sample's last pseudo-label this epoch, HIDDEN where none was kept.
    Returns (nan, 0) when no pseudo-label was kept.
    """
    kept = record != HIDDEN
    count = int(kept.sum())
    if count == 0:
        return float("nan"), 0
    return float((record[kept] == hidden[kept]).float().mean()), count
