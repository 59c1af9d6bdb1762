"""Does this machine's speed choice move accuracy? The assignment's configuration (adam 1e-3, dropout
0.25, batch 64, early stopping on validation loss with patience 3, at most 30 epochs, every label),
trained as float32 with every speed setting off and with the settings chosen here, seeds 0-2, both
CNNs, paired by seed. The chosen run's final weights are also scored in bf16 and in float32, to check
that evaluation may run in bf16. Writes accuracy-<capability>.json beside this file after every run,
one file per CPU capability torch reports (avx2, avx512, ...), since the choice differs by machine; a
rerun skips the runs that file holds.

    .venv/bin/python results/speed/accuracy.py
"""

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fmsearch import data, engine, speed

CAPABILITY = speed.machine(torch.device("cpu")).get("cpu_capability", "cpu").lower()
OUT = Path(__file__).with_name(f"accuracy-{CAPABILITY}.json")
BASE = engine.TrainConfig(epochs=30, patience=3)
MODES = {"float32": {"amp": False, "channels_last": False, "compile": False}, "chosen": {}}

runs = json.loads(OUT.read_text())["runs"] if OUT.exists() else []
splits = data.load_splits(data.DataConfig(), torch.device("cpu"))
for seed in range(3):
    for arch in ("plain", "adaptive"):
        for mode, forced in MODES.items():
            if any(r["seed"] == seed and r["arch"] == arch and r["mode"] == mode for r in runs):
                continue
            config = replace(BASE, arch=arch, seed=seed, **forced)
            result = engine.fit(config, splits)
            test = engine.evaluate(
                result.model, splits.test_images, splits.test_labels, splits.normalize, result.execution
            )
            run = {
                "seed": seed,
                "arch": arch,
                "mode": mode,
                "execution": result.execution.record(),
                "epochs": len(result.history),
                "best_epoch": result.best_epoch,
                "val_accuracy": result.best["val_accuracy"],
                "test_accuracy": test.accuracy,
                "seconds": result.seconds,
                "config": asdict(config),
            }
            if mode == "chosen":  # the same weights scored both ways
                for name, amp in (("float32", False), ("bf16", True)):
                    run[f"test_accuracy_eval_{name}"] = engine.evaluate(
                        result.model,
                        splits.test_images,
                        splits.test_labels,
                        splits.normalize,
                        replace(result.execution, amp=amp),
                    ).accuracy
            runs.append(run)
            record = {
                "machine": speed.machine(torch.device("cpu")),
                "date": time.strftime("%Y-%m-%d"),
                "runs": runs,
            }
            partial = OUT.with_suffix(".partial")
            partial.write_text(json.dumps(record, indent=1))
            os.replace(partial, OUT)
            print(seed, arch, mode, f"{test.accuracy:.4f}", f"{result.seconds:.0f} s", flush=True)
