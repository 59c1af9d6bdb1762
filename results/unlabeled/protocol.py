"""The semi-label protocol: real data, 5,000 labels (10% of the 50,000-image pool, stratified), both
CNNs, seeds 0-2, test accuracy of the weights chosen on validation, gains paired by seed against the
labels-only control (teacher 0, the same recipe on the labeled images alone).

    .venv/bin/python results/unlabeled/protocol.py VARIANT [ARCH ...] [--seeds 0,1,2]

Each run is one `fmsearch train` command; its --json record and the control's per-class recall (from
the teacher cache) go into runs.json beside this file as soon as it ends, and a rerun skips the runs
that file holds, so the protocol can be cut off and resumed. `table` prints the summary table.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = HERE / "runs.json"
HARD = {0: "T-shirt", 2: "pullover", 4: "coat", 6: "shirt"}
PROTOCOL = ["--labeled-fraction", "0.1", "--schedule", "cosine"]
# Each variant: the flags beyond the protocol's, per architecture (plain's teachers train on flips).
VARIANTS = {
    "distill-5x30": {
        arch: [
            "--unlabeled",
            "distill",
            "--teachers",
            "5",
            "--teacher-epochs",
            "30",
            "--epochs",
            "20",
            "--patience",
            "20",
            *(["--augment"] if arch == "plain" else []),
        ]
        for arch in ("plain", "adaptive")
    },
}
# Noisy Student (direction 2): the same teachers (cached), a noisier student, then rounds of students.
for name, noise in {
    "ns-strong": ["--student-view", "strong"],
    "ns-mixup": ["--mixup", "0.4"],
    "ns-strong-2rounds": ["--student-view", "strong", "--rounds", "2"],
}.items():
    VARIANTS[name] = {arch: [*flags, *noise] for arch, flags in VARIANTS["distill-5x30"].items()}
# The ablation: the same teachers distilled into a student on the labeled images only.
VARIANTS["distill-labeled"] = {
    arch: [*flags, "--distill-on", "labeled"] for arch, flags in VARIANTS["distill-5x30"].items()
}
# FixMatch warm-started from the labels-only control (distill's teacher 0, from the cache), with an
# EMA of the weights validated and kept, tau 0.9, SGD with Nesterov, cosine and weight decay 5e-4.
VARIANTS["fixmatch-warm"] = {
    arch: [
        "--unlabeled", "pseudo", "--warm-start", "--teacher-epochs", "30", "--tau", "0.9",
        "--optimizer", "sgd", "--nesterov", "--lr", "0.01", "--weight-decay", "0.0005",
        "--ema", "0.99", "--keep-ema", "--epochs", "15", "--patience", "15",
        *(["--augment"] if arch == "plain" else []),
    ]
    for arch in ("plain", "adaptive")
}  # fmt: skip
# ns-mixup for 30 epochs: the plain student still gained at epoch 20 of 20.
VARIANTS["ns-mixup-30ep"] = {
    arch: [*flags, "--mixup", "0.4", "--epochs", "30", "--patience", "30"]
    for arch, flags in VARIANTS["distill-5x30"].items()
}
# Its ablation: the same student recipe with soft targets on the labeled images only.
VARIANTS["ns-mixup-30ep-labeled"] = {
    arch: [*flags, "--distill-on", "labeled"] for arch, flags in VARIANTS["ns-mixup-30ep"].items()
}
# vat (direction 5) at the small synthetic task's best settings (eps 4, entropy minimisation weight
# 1, the defaults), with distill-5x30's student recipe; it trains no teacher, so its control is the
# cached teacher 0 of the same seed (the labels-only recipe every other variant is paired against).
VARIANTS["vat"] = {
    arch: [
        "--unlabeled",
        "vat",
        "--epochs",
        "20",
        "--patience",
        "20",
        *(["--augment"] if arch == "plain" else []),
    ]
    for arch in ("plain", "adaptive")
}


def load() -> list[dict]:
    return json.loads(RUNS.read_text()) if RUNS.exists() else []


def save(runs: list[dict]) -> None:
    partial = RUNS.with_suffix(".partial")
    partial.write_text(json.dumps(runs, indent=1))
    os.replace(partial, RUNS)


def cached_control(arch: str, seed: int, teacher_epochs: int) -> tuple[float, list[float]] | None:
    """Test accuracy and per-class test recall of teacher 0 (the labels-only control), from the
    teacher cache."""
    from fmsearch import data

    labels = data.load_splits(data.DataConfig(), torch.device("cpu")).test_labels
    for record_path in sorted((REPO / "results" / "teachers").glob(f"{arch}-seed{seed}-*.json")):
        record = json.loads(record_path.read_text())
        config = record.get("config", {})
        if config.get("labeled_fraction") == 0.1 and config.get("epochs") == teacher_epochs:
            logits = torch.load(record_path.with_name(record_path.stem + "-logits.pt"), weights_only=True)
            predicted = logits["test"][0].argmax(1)
            recall = [float((predicted[labels == c] == c).float().mean()) for c in range(10)]
            return record["test_accuracy"], recall
    return None


def control_recall(arch: str, seed: int, teacher_epochs: int) -> list[float] | None:
    control = cached_control(arch, seed, teacher_epochs)
    return control[1] if control else None


def teacher_epochs(variant: str, arch: str) -> int:
    flags = VARIANTS[variant][arch]
    return int(flags[flags.index("--teacher-epochs") + 1]) if "--teacher-epochs" in flags else 30


def run(variant: str, arch: str, seed: int) -> dict:
    out = HERE / f".{variant}-{arch}-s{seed}.json"
    command = ["fmsearch", "train", "--arch", arch, "--seed", str(seed), *PROTOCOL, *VARIANTS[variant][arch]]
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "fmsearch.cli", *command[1:], "--json", str(out)],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    record = json.loads(out.read_text())
    team = record.get("teacher_team") or {}
    members = team.get("members") or []
    # No teacher trained (vat): the control is the same seed's cached teacher 0, when there is one.
    control = cached_control(arch, seed, teacher_epochs(variant, arch))
    return {
        "variant": variant,
        "arch": arch,
        "seed": seed,
        "command": " ".join(command),
        "control": members[0]["test_accuracy"] if members else control and control[0],
        "control_recall": control and control[1],
        "ensemble": team.get("test_accuracy"),
        "student": record["test_accuracy"],
        "student_recall": record["test_recall"],
        "best_epoch": record.get("best_epoch"),
        "seconds": time.monotonic() - started,
        "teacher_seconds": team.get("seconds"),
        "execution": record.get("execution"),
        "git_revision": record.get("git_revision"),
    }


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def hard_recall_gain(rows: list[dict]) -> str:
    if not all(r["control_recall"] for r in rows):
        return "-"
    gains = {
        name: 100 * statistics.mean(r["student_recall"][c] - r["control_recall"][c] for r in rows)
        for c, name in HARD.items()
    }
    return ", ".join(f"{name} {gain:+.1f}" for name, gain in gains.items())


def arithmetic(run: dict) -> str:
    """bf16 or float32: the same seed's control differs between the two, so rows never mix them."""
    return "bf16" if (run.get("execution") or {}).get("amp") else "float32"


def table(runs: list[dict]) -> str:
    lines = [
        "| variant | arch | arithmetic | n | control | ensemble | student | gain (points) | SE "
        "| hard-class recall gain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = sorted({(r["variant"], r["arch"], arithmetic(r)) for r in runs})
    for variant, arch, kind in groups:
        rows = [r for r in runs if (r["variant"], r["arch"], arithmetic(r)) == (variant, arch, kind)]
        gains = [100 * (r["student"] - r["control"]) for r in rows if r["control"] is not None]
        se = f"{statistics.stdev(gains) / len(gains) ** 0.5:.2f}" if len(gains) > 1 else "-"
        gain = f"{statistics.mean(gains):+.2f}" if gains else "-"
        cells = [
            variant, arch, kind, str(len(rows)),
            mean_sd([r["control"] for r in rows if r["control"] is not None]),
            mean_sd([r["ensemble"] for r in rows if r["ensemble"] is not None]),
            mean_sd([r["student"] for r in rows]), gain, se, hard_recall_gain(rows),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        runs = load()
        for r in runs:  # runs recorded before the control's recall was looked up by its teacher epochs
            if r["control"] is not None and not r["control_recall"]:
                r["control_recall"] = control_recall(
                    r["arch"], r["seed"], teacher_epochs(r["variant"], r["arch"])
                )
        save(runs)
        print(table(runs))
        sys.exit()
    args, seeds = sys.argv[1:], range(3)
    if "--seeds" in args:
        at = args.index("--seeds")
        seeds = [int(s) for s in args[at + 1].split(",")]
        args = args[:at] + args[at + 2 :]
    variant, archs = args[0], args[1:] or ["plain", "adaptive"]
    for seed in seeds:
        for arch in archs:
            runs = load()
            if any((r["variant"], r["arch"], r["seed"]) == (variant, arch, seed) for r in runs):
                continue
            record = run(variant, arch, seed)
            runs = load() + [record]
            save(runs)
            print(
                f"{variant} {arch} seed {seed}: control {record['control']}, ensemble {record['ensemble']}, "
                f"student {record['student']}, {record['seconds']:.0f} s",
                flush=True,
            )
