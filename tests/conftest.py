"""Fixtures: tiny Fashion-MNIST look-alikes written in the real IDX format, so the real loader runs."""

from __future__ import annotations

import gzip
import hashlib
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

# `make test` runs one pytest worker per core (pytest-xdist), so each runs torch on one thread: the
# tests' batches of 10-64 images gain nothing from a second thread, and two workers on two threads
# each would fight over the cores. Set before torch is imported; the commands the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite, its workers and the commands they start share one choice of speed settings
# (speed.choose), measured once into a folder of their own rather than the user's cache.
os.environ.setdefault("FMSEARCH_CACHE", tempfile.mkdtemp(prefix="fmsearch-cache-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fmsearch import data  # noqa: E402

REAL_ROOT = data.data_root().resolve()


def write_idx_images(path: Path, images: np.ndarray) -> None:
    path.write_bytes(struct.pack(">IIII", 0x803, *images.shape) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def learnable_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class k is a bright 7x7 square at its own place on a 4x3 grid, jittered, over noise."""
    images = rng.integers(0, 70, size=(len(labels), 28, 28))
    for i, label in enumerate(labels):
        top = 2 + (label // 4) * 8 + rng.integers(-1, 2)
        left = 1 + (label % 4) * 7 + rng.integers(0, 2)
        images[i, top : top + 7, left : left + 6] = rng.integers(170, 256)
    return images


def texture_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class k is stripes of period 2 + k // 2, horizontal for even k, vertical for odd, at a random phase.

    Unlike the squares above, a class survives flips, shifts, small rotations and contrast changes:
    what semi-supervised augmentations assume of clothing.
    """
    period = 2 + labels // 2
    phase = rng.integers(0, 8, size=len(labels))
    wave = (np.arange(28)[None, :] + phase[:, None]) % (2 * period[:, None]) < period[:, None]  # (N, 28)
    stripes = np.where((labels % 2 == 0)[:, None, None], wave[:, :, None], wave[:, None, :])
    base = rng.integers(60, 120, size=(len(labels), 1, 1))
    return np.clip(base + 90 * stripes + rng.normal(0, 30, size=stripes.shape), 0, 255)


@dataclass
class TinyData:
    root: Path
    checksums: dict[str, tuple[int, str]]

    def config(self, **overrides) -> data.DataConfig:
        values = {"root": self.root, "val_size": 200, "checksums": self.checksums, **overrides}
        return data.DataConfig(**values)

    def splits(self, **overrides) -> data.Splits:
        return data.load_splits(self.config(**overrides), torch.device("cpu"))


def write_tiny_fashion_mnist(
    root: Path, n_train: int = 1200, n_test: int = 300, seed: int = 0, draw=learnable_images
) -> TinyData:
    rng = np.random.default_rng(seed)
    raw = data.raw_folder(root)
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", draw(labels, rng))
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    checksums = {
        name: ((raw / name).stat().st_size, hashlib.md5((raw / name).read_bytes()).hexdigest())
        for name in data.CHECKSUMS
    }
    return TinyData(root, checksums)


def pytest_configure(config):
    """Time this machine's speed settings once, before any worker starts and any test counts
    optimizer steps; pytest-xdist's workers (which carry `workerinput`) read the file it writes."""
    if not hasattr(config, "workerinput"):
        from fmsearch import speed

        speed.choose("cpu")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyData:
    """A learnable 1,200/300-image dataset in Fashion-MNIST's IDX format (read-only: don't modify)."""
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("tiny-fmnist"))


@pytest.fixture(scope="session")
def textures(tmp_path_factory) -> TinyData:
    """A 1,200/300-image stripe-texture dataset whose classes survive the semi-supervised augmentations."""
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("textures"), draw=texture_images)


@pytest.fixture(scope="session")
def tiny_splits(tiny) -> data.Splits:
    return tiny.splits()


def real_data_present() -> bool:
    try:
        data.verify(REAL_ROOT)
    except data.DataError:
        return False
    return True


needs_real_data = pytest.mark.skipif(
    not real_data_present(), reason="real Fashion-MNIST not found: run `make data`"
)


def gzip_into(folder: Path, raw: Path) -> None:
    """Write each raw file of `raw` as NAME.gz into `folder`, as Debian's package lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in raw.iterdir():
        (folder / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))


class QuietProgress:
    """study.TrialProgress that shows nothing."""

    def epoch_start(self, epoch: int, steps: int) -> None: ...
    def step(self) -> None: ...
    def epoch_end(self, metrics: dict) -> None: ...
    def close(self) -> None: ...


class QuietReporter:
    """study.Reporter for tests; a module-level class so that spawned workers can unpickle it."""

    def __init__(self, worker: int = 0):
        self.ended = []
        self.warnings = []

    def trial_progress(self, study_name: str, number: int, max_epochs: int) -> QuietProgress:
        return QuietProgress()

    def trial_end(self, outcome) -> None:
        self.ended.append(outcome)

    def warn(self, line: str) -> None:
        self.warnings.append(line)


TINY_STUDY = """
description = "tiny: full labels against half the labels"
trials = 3
max_epochs = 3
batch_size = 32
patience = 2

[sampler]
name = "tpe"
seed = 0

[pruner]
name = "none"

[fixed]
optimizer = "adam"

[conditions]
labeled_fraction = [1.0, 0.5]

[space]
arch = ["plain", "adaptive"]
lr = { low = 1e-3, high = 3e-3, log = true }
dropout = { low = 0.0, high = 0.5 }
unlabeled = ["skip", "pseudo"]
tau = { low = 0.8, high = 0.95 }
"""


SPACE = """arch = ['plain', 'adaptive']
lr = { low = 1e-3, high = 3e-3, log = true }
dropout = { low = 0.0, high = 0.5 }"""


def study_text(
    trials=3, max_epochs=3, patience=2, pruner="name = 'none'", fixed="optimizer = 'adam'", space=SPACE
):
    """A one-condition (full labels) study file for the tiny data."""
    return (
        f'description = "a test study"\ntrials = {trials}\nmax_epochs = {max_epochs}\nbatch_size = 32\n'
        f"patience = {patience}\n\n[sampler]\nname = 'tpe'\nseed = 0\n\n[pruner]\n{pruner}\n\n"
        f"[fixed]\n{fixed}\n\n[conditions]\nlabeled_fraction = [1.0]\n\n[space]\n{space}\n"
    )


def write_study(folder: Path, text: str = TINY_STUDY, name: str = "tiny") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


@dataclass
class TinyStudy:
    spec: object  # spec.StudySpec
    options: object  # study.RunOptions
    summaries: list

    @property
    def storage(self) -> str:
        return self.options.storage


def run_tiny_study(
    folder: Path,
    tiny: TinyData,
    text: str = TINY_STUDY,
    name: str = "tiny",
    trials: int | None = None,
    epochs: int | None = None,
    archive_changed: bool = False,
    **options,
) -> TinyStudy:
    """Run a study file over the tiny data, with its storage and results under `folder`.

    `trials` and `epochs` override the file's, as `fmsearch study --trials --epochs` does.
    """
    from fmsearch import spec, study

    folder.mkdir(parents=True, exist_ok=True)
    study_spec = spec.parse(write_study(folder, text, name))
    study_spec = study_spec.overridden(trials, epochs)  # what `fmsearch study --trials --epochs` calls
    values = {
        "storage": f"sqlite:///{folder}/studies.db",
        "results_dir": folder / "results",
        "device": "cpu",
        "heartbeat_interval": 1,
        "grace_period": 3,
        "data_config": tiny.config(),
        **options,
    }
    run_options = study.RunOptions(**values)
    study.prepare(study_spec, run_options, archive_changed=archive_changed)
    splits = study.load_splits(study_spec, run_options)
    summaries = study.run(study_spec, run_options, QuietReporter, splits)
    return TinyStudy(study_spec, run_options, summaries)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, tiny) -> TinyStudy:
    """The tiny study, run once for every test that reads its storage (read-only: don't add trials)."""
    return run_tiny_study(tmp_path_factory.mktemp("tiny-study"), tiny)


def _postgres_bin() -> Path | None:
    """Debian's PostgreSQL server binaries (/usr/lib/postgresql/<version>/bin), newest first."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if found:
        return found[0].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@dataclass
class Postgres:
    """A real PostgreSQL server on 127.0.0.1, in a temporary data folder, with a password login."""

    bin: Path
    data: Path
    port: int
    run_as: str | None  # initdb and the server refuse to run as root
    user: str = "fmsearch"
    password: str = "pa55-w0rd-nobody-may-see"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(self.bin / "pg_ctl"), "-D", str(self.data), *args]
        return subprocess.run(command, user=self.run_as, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.data}"
        result = self.pg_ctl(
            "-o", options + " -c fsync=off", "-l", str(self.data / "server.log"), "-w", "start"
        )
        assert result.returncode == 0, result.stderr + (self.data / "server.log").read_text()[-2000:]

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "-w", "stop")

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t{uuid.uuid4().hex[:12]}"
        dsn = f"host=127.0.0.1 port={self.port} user={self.user} password={self.password} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """Debian's `postgresql` server, started for the session on loopback and stopped after it."""
    pytest.importorskip("psycopg", reason="no psycopg: `make setup` installs the postgres extra")
    binaries = _postgres_bin()
    if binaries is None:
        pytest.skip("no PostgreSQL server: `make postgres` installs Debian's package as root")
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' user for the server to run as")
        run_as = "postgres"
    root = Path(tempfile.mkdtemp(prefix="fmsearch-pg-"))
    root.chmod(0o755)
    server = Postgres(binaries, root / "data", _free_port(), run_as)
    password_file = root / "password"
    password_file.write_text(server.password)
    if run_as:
        shutil.chown(root, run_as)
        shutil.chown(password_file, run_as)
    initdb = [
        str(binaries / "initdb"), "-D", str(server.data), "-U", server.user, f"--pwfile={password_file}",
        "--auth=scram-sha-256", "-E", "UTF8", "--no-sync",
    ]  # fmt: skip
    result = subprocess.run(initdb, user=run_as, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh database on the session's PostgreSQL server, password in the URL."""
    return postgres_server.create_database()


def messages(stderr: str) -> list[str]:
    """The lines a command printed to stderr, without its tqdm progress bars."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)  # tqdm's cursor movements
    return [
        line.strip()
        for line in re.split(r"[\r\n]", plain)
        if line.strip() and not re.search(r"\d+%\||batch/s|\bbatch\]", line)
    ]
