"""Find, verify and load Fashion-MNIST; hold out a validation split; keep it on the device.

The images stay uint8 everywhere (47 MB for the training set instead of 188 MB of float32) and
are normalized on the fly, on the device, with the training pool's mean and std.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from fmsearch.errors import FmsearchError
from fmsearch.files import write_atomic

# torchvision's FashionMNIST.classes. torchvision itself is imported only to download: importing it
# cost 3.7 s of CPU per process (AMD EPYC, 2026-12-02), and every study worker loads the data.
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"

# Decompressed raw files as torchvision expects them: name -> (bytes, md5).
CHECKSUMS: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (47040016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (60008, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (7840016, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (10008, "15d484375f8d13e6eb1aabb0c3f46965"),
}


class DataError(FmsearchError):
    """The data is missing or corrupt; the message names the file and the fix."""


def data_root() -> Path:
    """The data folder: $FMSEARCH_DATA, else ./data."""
    return Path(os.environ.get("FMSEARCH_DATA", "data"))


def raw_folder(root: Path) -> Path:
    return Path(root) / "FashionMNIST" / "raw"


def _md5(path: Path) -> str:
    """The file's md5, hashed once per process for as long as its size, time and inode stay the same
    (`fmsearch study` verifies the data when it finds it and again when it loads it)."""
    stat = path.stat()
    return _md5_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.cache
def _md5_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(root: Path, checksums: dict[str, tuple[int, str]] = CHECKSUMS) -> None:
    """Check each raw file's size and md5; raise DataError naming the first bad one."""
    for name, (size, md5) in checksums.items():
        path = raw_folder(root) / name
        if not path.exists():
            raise DataError(f"{path} is missing: run `make data` to fetch Fashion-MNIST")
        if path.stat().st_size != size or _md5(path) != md5:
            raise DataError(f"{path} is corrupt (size or checksum mismatch): delete it and run `make data`")


def _have_raw(root: Path, checksums: dict[str, tuple[int, str]]) -> bool:
    return all((raw_folder(root) / name).exists() for name in checksums)


def _gunzip(source: Path, target: Path) -> None:
    """Decompress `source` into `target`; a truncated or damaged archive is a DataError naming it."""
    try:
        with gzip.open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(
            f"{source} is truncated or damaged ({error}): reinstall the package that holds it, "
            "or delete it and run `make data`"
        ) from None


def _decompress_from(folder: Path, root: Path, checksums: dict[str, tuple[int, str]]) -> bool:
    sources = [folder / f"{name}.gz" for name in checksums]
    if not all(p.exists() for p in sources):
        return False
    raw_folder(root).mkdir(parents=True, exist_ok=True)
    for source in sources:
        target = raw_folder(root) / source.stem
        write_atomic(target, functools.partial(_gunzip, source))  # never half a file under the real name
    return True


def ensure(
    root: Path | None = None,
    checksums: dict[str, tuple[int, str]] = CHECKSUMS,
    debian_dir: Path = DEBIAN_DIR,
) -> str:
    """Make the raw files exist and verify them; return which source was used.

    Order: files already under root, Debian's package files, then torchvision's download. Installing
    Debian's package is `make data`'s job; library code runs no package manager.
    """
    root = Path(root or data_root())
    if _have_raw(root, checksums):
        source = f"local files in {raw_folder(root)}"
    elif _decompress_from(debian_dir, root, checksums):
        source = f"Debian's {DEBIAN_PACKAGE} in {debian_dir}"
    else:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception as error:  # torchvision raises bare RuntimeError/URLError on no network
            raise DataError(
                f"could not download Fashion-MNIST ({error}): run `make data` (it installs Debian's "
                f"{DEBIAN_PACKAGE} where it can), `apt-get install {DEBIAN_PACKAGE}`, "
                f"or put the four raw files in {raw_folder(root)}"
            ) from None
        source = "torchvision's download"
    verify(root, checksums)
    return source


@dataclass(frozen=True)
class Arrays:
    """The full dataset as CPU tensors: images uint8 (N, 28, 28), labels int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (Fashion-MNIST's format) as a uint8 tensor of its shape.

    The header is two zero bytes, the type 0x08, the number of dimensions, then each size as a
    big-endian uint32; the bytes follow. Raises ValueError for anything else.
    """
    raw = path.read_bytes()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path.name} is not an IDX file of unsigned bytes")
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != math.prod(shape):
        raise ValueError(f"{path.name} holds {body.size} bytes where its header says {math.prod(shape)}")
    return torch.from_numpy(body.reshape(shape).copy())


def load(root: Path | None = None, checksums: dict[str, tuple[int, str]] = CHECKSUMS) -> Arrays:
    """Load the verified raw files: uint8 images and int64 labels, as torchvision's loader gives them."""
    root = Path(root or data_root())
    verify(root, checksums)
    try:
        train_images, train_labels, test_images, test_labels = (
            read_idx(raw_folder(root) / name) for name in CHECKSUMS
        )
    except ValueError as error:
        raise DataError(
            f"{raw_folder(root)} could not be read ({error}): delete it and run `make data`"
        ) from None
    return Arrays(train_images, train_labels.long(), test_images, test_labels.long())


def split_validation(labels: torch.Tensor, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded hold-out: returns (train_pool_indices, val_indices), each sorted."""
    indices = np.arange(len(labels))
    pool, val = train_test_split(
        indices, test_size=val_size, stratify=labels.numpy(), random_state=seed, shuffle=True
    )
    return np.sort(pool), np.sort(val)


@dataclass(frozen=True)
class DataConfig:
    root: Path | None = None  # None: $FMSEARCH_DATA or ./data
    val_size: int = 10_000  # images held out of the 60,000 for model selection
    split_seed: int = 0  # the validation split is the same for every trial of a study
    pool_limit: int | None = None  # keep only this many training-pool images (smoke runs, tests)
    checksums: dict[str, tuple[int, str]] = field(default_factory=lambda: dict(CHECKSUMS))  # tests: their own


@dataclass(frozen=True)
class Splits:
    """Device-resident uint8 images and int64 labels for each split, plus normalization stats."""

    train_images: torch.Tensor  # the training pool: 60,000 minus the validation split
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor  # touched only to evaluate a finished model
    test_labels: torch.Tensor
    mean: float  # of the training pool's pixels, in [0, 1] units
    std: float

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28), standardized."""
        return ((images.unsqueeze(1).float() / 255.0) - self.mean) / self.std

    @functools.cached_property
    def digest(self) -> str:
        """A short hash of the pool images and the validation split, computed once per Splits."""
        h = hashlib.sha256()
        for t in (self.train_images, self.val_images, self.val_labels):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def split_indices(labels: torch.Tensor, config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training pool, validation) indices into the training set, each sorted.

    With `config.pool_limit`, the pool is a stratified, seeded slice of that many images.
    """
    pool, val = split_validation(labels, config.val_size, config.split_seed)
    if config.pool_limit is not None and config.pool_limit < len(pool):
        _check_pool_limit(config.pool_limit, len(pool), len(CLASSES))
        pool, _ = train_test_split(
            pool,
            train_size=config.pool_limit,
            stratify=labels.numpy()[pool],
            random_state=config.split_seed,
        )
        pool = np.sort(pool)
    return pool, val


def _check_pool_limit(limit: int, pool: int, classes: int) -> None:
    """A stratified slice keeps one image of each class on both sides, or sklearn raises."""
    if limit < classes:
        raise DataError(
            f"pool_limit {limit} is too small: a stratified slice needs at least {classes} images, "
            f"one per class; use {classes} or more"
        )
    if pool - limit < classes:
        raise DataError(
            f"pool_limit {limit} leaves {pool - limit} of the {pool}-image pool out, and a stratified "
            f"slice needs at least {classes} left out: use at most {pool - classes}, or drop pool_limit "
            "to train on the whole pool"
        )


def make_splits(arrays: Arrays, config: DataConfig, device: torch.device) -> Splits:
    """Split the training set into pool and validation, and move everything to the device once."""
    pool, val = split_indices(arrays.train_labels, config)
    pool_t, val_t = torch.from_numpy(pool), torch.from_numpy(val)
    pool_images = arrays.train_images[pool_t]
    scaled = pool_images.float() / 255.0
    return Splits(
        train_images=pool_images.to(device),
        train_labels=arrays.train_labels[pool_t].to(device),
        val_images=arrays.train_images[val_t].to(device),
        val_labels=arrays.train_labels[val_t].to(device),
        test_images=arrays.test_images.to(device),
        test_labels=arrays.test_labels.to(device),
        mean=scaled.mean().item(),
        std=scaled.std().item(),
    )


def load_splits(config: DataConfig, device: torch.device) -> Splits:
    """Verify, load and split the data of `config` onto `device`."""
    return make_splits(load(config.root, config.checksums), config, device)
