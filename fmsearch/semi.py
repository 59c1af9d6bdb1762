"""Semi-label training: the labeled subset, a homogeneous-batch sampler, and unlabeled objectives.

A labeled batch trains with cross-entropy. What an unlabeled batch does is an `UnlabeledObjective`:
`skip` (the assignment's baseline: nothing, not even a gather) or `pseudo` (FixMatch-style
confidence-thresholded pseudo-labels, weak view -> strong view, batched on the device).
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

    @property
    def fraction(self) -> float:
        return len(self.labeled) / len(self.targets)


def labeled_count_for(pool_size: int, fraction: float | None, count: int | None) -> int:
    """The number of labeled samples asked for by a fraction (0, 1] or an absolute count."""
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of labeled fraction or labeled count")
    if count is None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"labeled fraction must be in (0, 1], got {fraction}")
        count = round(fraction * pool_size)
    if not 0 < count <= pool_size:
        raise ValueError(f"labeled count must be in 1..{pool_size}, got {count}")
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
            raise ValueError(f"a stratified pick needs at least {n_classes} labeled and unlabeled samples")
        labeled, unlabeled = train_test_split(
            everything, train_size=count, stratify=labels_cpu.numpy(), random_state=seed
        )
    labeled_t = torch.from_numpy(np.sort(labeled)).long()
    unlabeled_t = torch.from_numpy(np.sort(unlabeled)).long()
    targets = labels_cpu.clone()
    targets[unlabeled_t] = HIDDEN
    return LabeledSubset(labeled_t, unlabeled_t, targets.to(labels.device), labels.clone())


class SemiBatchSampler(Sampler[list[int]]):
    """Yields lists of indices; every batch is all-labeled or all-unlabeled.

    Each epoch covers every labeled and every unlabeled index exactly once (the last short batch
    of each kind is dropped only with drop_last=True). Labeled batches are spread evenly among
    the unlabeled ones with a random phase. The order is reshuffled each epoch, deterministically
    from (seed, epoch); the epoch advances on every iteration, or is set with set_epoch().
    A full-label run is the case with no unlabeled indices.
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
        self.labeled = np.asarray(labeled_indices, dtype=np.int64)
        self.unlabeled = np.asarray(unlabeled_indices, dtype=np.int64)
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

    def _chunks(self, indices: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        order = rng.permutation(indices).tolist()
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        return [order[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        labeled = self._chunks(self.labeled, rng)
        unlabeled = self._chunks(self.unlabeled, rng)
        total = len(labeled) + len(unlabeled)
        # Labeled batch k goes to slot floor((k + phase) * total / L): evenly spaced, all distinct.
        phase = rng.random()
        slots = {math.floor((k + phase) * total / len(labeled)): k for k in range(len(labeled))}
        next_unlabeled = iter(unlabeled)
        for position in range(total):
            yield labeled[slots[position]] if position in slots else next(next_unlabeled)


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
    """Weak, then random contrast and brightness, then a cutout square of 8 to 14 px."""
    x = weak_augment(images, generator)
    b, _, h, w = x.shape
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * _uniform(b, 0.5, 1.5, x, generator) + mean
    x = (x + _uniform(b, -0.2, 0.2, x, generator)).clamp(0.0, 1.0)
    size = torch.randint(8, 15, (b, 1, 1), device=x.device, generator=generator)
    top = (torch.rand(b, 1, 1, device=x.device, generator=generator) * (h - size + 1)).long()
    left = (torch.rand(b, 1, 1, device=x.device, generator=generator) * (w - size + 1)).long()
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    hole = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return x.masked_fill(hole.unsqueeze(1), 0.0)


@dataclass
class UnlabeledStep:
    """What one unlabeled batch produced; every tensor stays on the device."""

    loss: torch.Tensor  # scalar, already weighted; backpropagated by the engine
    pseudo_labels: torch.Tensor  # int64 (B,), HIDDEN where below the threshold


class UnlabeledObjective:
    """What an unlabeled batch does. `gathers_images` False means the engine skips the batch."""

    name = "base"
    gathers_images = True

    def __call__(
        self, model: nn.Module, images: torch.Tensor, normalize, generator: torch.Generator
    ) -> UnlabeledStep:
        raise NotImplementedError


class Skip(UnlabeledObjective):
    """The assignment's baseline: no gradient step, no gather."""

    name = "skip"
    gathers_images = False


class PseudoLabel(UnlabeledObjective):
    """FixMatch for homogeneous batches: pseudo-label a weak view, train the strong view.

    The weak view is predicted in eval mode (no dropout) without gradients; predictions whose
    confidence reaches `tau` become targets for the strong view, weighted by `lambda_u`.
    """

    name = "pseudo"

    def __init__(self, tau: float, lambda_u: float):
        self.tau = tau
        self.lambda_u = lambda_u

    def __call__(self, model, images, normalize, generator):
        pixels = images.unsqueeze(1).float() / 255.0
        with torch.no_grad():
            model.eval()
            probs = torch.softmax(model(normalize(weak_augment(pixels, generator))).float(), dim=1)
            model.train()
        confidence, pseudo = probs.max(dim=1)
        mask = confidence >= self.tau
        logits = model(normalize(strong_augment(pixels, generator)))
        per_sample = F.cross_entropy(logits.float(), pseudo, reduction="none")
        loss = self.lambda_u * (per_sample * mask).mean()
        return UnlabeledStep(loss, torch.where(mask, pseudo, HIDDEN))


def make_objective(name: str, tau: float, lambda_u: float) -> UnlabeledObjective:
    """The unlabeled objective by name: 'skip' or 'pseudo'."""
    if name == "skip":
        return Skip()
    if name == "pseudo":
        return PseudoLabel(tau, lambda_u)
    raise ValueError(f"unknown unlabeled objective {name!r}: choose 'skip' or 'pseudo'")


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
