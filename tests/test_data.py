import subprocess
import sys

import numpy as np
import pytest
import torch

from fmsearch import data
from tests.conftest import gzip_into, write_tiny_fashion_mnist


def test_ensure_decompresses_debian_files_and_says_so(tmp_path, tiny):
    debian = tmp_path / "debian"
    gzip_into(debian, data.raw_folder(tiny.root))
    root = tmp_path / "data"
    source = data.ensure(root, tiny.checksums, debian_dir=debian)
    assert "Debian" in source
    assert data.ensure(root, tiny.checksums, debian_dir=debian).startswith("local files")
    data.verify(root, tiny.checksums)


def test_checksum_failure_names_the_file_and_the_fix(tmp_path):
    bad = write_tiny_fashion_mnist(tmp_path / "bad")
    labels = data.raw_folder(bad.root) / "train-labels-idx1-ubyte"
    corrupted = bytearray(labels.read_bytes())
    corrupted[-1] ^= 0xFF
    labels.write_bytes(bytes(corrupted))
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte is corrupt.*make data"):
        data.verify(bad.root, bad.checksums)


def test_missing_file_names_the_file(tmp_path):
    gone = write_tiny_fashion_mnist(tmp_path / "gone")
    (data.raw_folder(gone.root) / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte is missing"):
        data.verify(gone.root, gone.checksums)


def test_cli_reports_corrupt_data_in_one_line_without_traceback(tmp_path):
    root = tmp_path / "data"
    raw = data.raw_folder(root)
    raw.mkdir(parents=True)
    for name in data.CHECKSUMS:
        (raw / name).write_bytes(b"\0" * 16)  # present, so no fetch is tried, but wrong
    result = subprocess.run(
        [sys.executable, "-m", "fmsearch.cli", "data"],
        capture_output=True,
        text=True,
        env={"FMSEARCH_DATA": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "corrupt" in lines[0] and "make data" in lines[0]


def test_loads_uint8_images_exactly_as_torchvision_reads_them(tiny):
    from torchvision.datasets import FashionMNIST

    arrays = data.load(tiny.root, tiny.checksums)
    assert arrays.train_images.dtype == torch.uint8 and arrays.train_labels.dtype == torch.int64
    assert arrays.train_images.shape == (1200, 28, 28) and arrays.test_labels.shape == (300,)
    for train, images, labels in (
        (True, arrays.train_images, arrays.train_labels),
        (False, arrays.test_images, arrays.test_labels),
    ):
        reference = FashionMNIST(str(tiny.root), train=train, download=False)
        assert torch.equal(images, reference.data) and torch.equal(labels, reference.targets)
    assert list(data.CLASSES) == FashionMNIST.classes


def test_a_file_that_is_not_idx_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)  # a float IDX header
    with pytest.raises(ValueError, match="train-images-idx3-ubyte is not an IDX file of unsigned bytes"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # says 5 bytes, holds 3
    with pytest.raises(ValueError, match="holds 3 bytes where its header says 5"):
        data.read_idx(path)


def test_validation_split_is_stratified_disjoint_and_deterministic(tiny):
    labels = data.load(tiny.root, tiny.checksums).train_labels
    pool, val = data.split_validation(labels, 200, seed=3)
    again_pool, again_val = data.split_validation(labels, 200, seed=3)
    other_pool, _ = data.split_validation(labels, 200, seed=4)
    assert len(val) == 200 and len(pool) == 1000
    assert not set(pool) & set(val)
    assert np.array_equal(val, again_val) and np.array_equal(pool, again_pool)
    assert not np.array_equal(pool, other_pool)
    assert np.bincount(labels.numpy()[val], minlength=10).tolist() == [20] * 10


def test_splits_keep_uint8_and_normalize_with_pool_stats(tiny_splits):
    assert tiny_splits.train_images.dtype == torch.uint8
    x = tiny_splits.normalize(tiny_splits.train_images)
    assert x.shape == (1000, 1, 28, 28)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2


def test_pool_limit_keeps_a_stratified_slice(tiny):
    splits = tiny.splits(pool_limit=500)
    assert len(splits.train_labels) == 500
    assert torch.bincount(splits.train_labels, minlength=10).tolist() == [50] * 10


def test_a_truncated_debian_archive_is_one_data_error_naming_it_and_leaves_no_partial_file(tmp_path, tiny):
    debian = tmp_path / "debian"
    gzip_into(debian, data.raw_folder(tiny.root))
    archive = debian / "train-images-idx3-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    root = tmp_path / "data"
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz is truncated or damaged.*make data"):
        data.ensure(root, tiny.checksums, debian_dir=debian)
    assert not [p for p in data.raw_folder(root).iterdir() if "partial" in p.name]


@pytest.mark.parametrize("limit", [5, 995])  # the tiny pool holds 1,000 images after 200 for validation
def test_a_pool_limit_the_stratified_slice_cannot_meet_is_one_data_error(tiny, limit):
    expected = f"pool_limit {limit} (is too small|leaves 5 of the 1000-image pool)"
    with pytest.raises(data.DataError, match=expected):
        tiny.splits(pool_limit=limit)
