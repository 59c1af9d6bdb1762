"""Label propagation on the labels-only control's features: a screen of direction 4 (issue 18).

    .venv/bin/python results/unlabeled/labelprop.py [ARCH ...] [--seed 0]

Needs the control (teacher 0 of `protocol.py`'s distill variants) in the teacher cache. It embeds the
50,000-image training pool (labeled and unlabeled; never the validation or test images) with the
control's penultimate layer, links each image to its k = 50 nearest neighbours by cosine similarity
(weights: similarity cubed, symmetrised), and spreads the 5,000 labels over that graph (Zhou et al.
2004; the graph of Iscen et al. 2019). It prints how often each target's argmax is the hidden label of
an unlabeled pool image: the control's own predictions, the five teachers' ensemble, the spread labels,
and the spread labels averaged with the control's probabilities. Those targets are what a student
would learn; a screen that does not beat the ensemble's targets is not worth a student run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
K, POWER, ITERATIONS = 50, 3, 30


def team(arch: str, seed: int) -> list[tuple[dict, Path]]:
    """The protocol's teachers of `seed` in the cache (10% labels, 30 epochs): records and weights,
    teacher 0 (the control) first."""
    found = []
    for record_path in (REPO / "results" / "teachers").glob(f"{arch}-seed*.json"):
        record = json.loads(record_path.read_text())
        config = record.get("config", {})
        if (
            config.get("labeled_fraction") == 0.1
            and config.get("epochs") == 30
            and record["seed"] % 1000 == seed
        ):
            found.append((record, record_path.with_name(record["state"])))
    if not any(record["seed"] == seed for record, _ in found):
        sys.exit(f"no control for {arch} seed {seed} in results/teachers: run protocol.py distill-5x30 first")
    return sorted(found, key=lambda entry: entry[0]["seed"])


def features(model: torch.nn.Module, images: torch.Tensor, normalize) -> torch.Tensor:
    """(N, 128) penultimate activations (fc1 after its ReLU), L2-normalised."""
    captured = []
    handle = model.fc2.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(images), 2048):
            model(normalize(images[start : start + 2048]))
    handle.remove()
    return F.normalize(torch.cat(captured), dim=1)


def knn_graph(x: torch.Tensor) -> torch.Tensor:
    """The symmetric normalised affinity D^-1/2 W D^-1/2 of the k-nearest-neighbour graph, sparse."""
    rows, cols, weights = [], [], []
    for start in range(0, len(x), 2048):
        sims = x[start : start + 2048] @ x.T
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -1  # no self-loops
        top, index = sims.topk(K, dim=1)
        rows.append(torch.arange(start, start + len(sims)).repeat_interleave(K))
        cols.append(index.flatten())
        weights.append(top.clamp(min=0).pow(POWER).flatten())
    n = len(x)
    w = torch.sparse_coo_tensor(
        torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(weights), (n, n), check_invariants=False
    )
    w = (w + w.t()).coalesce()
    degree = torch.sparse.sum(w, dim=1).to_dense().clamp(min=1e-12)
    scale = degree.rsqrt()
    i = w.indices()
    return torch.sparse_coo_tensor(
        i, w.values() * scale[i[0]] * scale[i[1]], (n, n), check_invariants=False
    ).coalesce()


def spread(graph: torch.Tensor, seeds: torch.Tensor, alpha: float) -> torch.Tensor:
    """Label spreading: F <- alpha S F + (1 - alpha) Y, from Y, for ITERATIONS steps; rows sum to 1."""
    f = seeds.clone()
    for _ in range(ITERATIONS):
        f = alpha * torch.sparse.mm(graph, f) + (1 - alpha) * seeds
    return f.clamp(min=0) / f.clamp(min=0).sum(1, keepdim=True).clamp(min=1e-12)


def screen(arch: str, seed: int) -> list[tuple[str, float]]:
    from fmsearch import data, engine
    from fmsearch.models import build_model

    splits = data.load_splits(data.DataConfig(), torch.device("cpu"))
    config = engine.TrainConfig(arch=arch, seed=seed, labeled_fraction=0.1)
    subset = engine.make_subset(config, splits)
    teachers = team(arch, seed)
    record, weights = teachers[0]
    model = build_model(arch, record["config"]["dropout"])
    model.load_state_dict(torch.load(weights, weights_only=True))
    pool = [torch.load(w.with_name(w.stem + "-logits.pt"), weights_only=True)["pool"][0] for _, w in teachers]
    unlabeled, hidden = subset.unlabeled, subset.hidden

    def accuracy(probs: torch.Tensor) -> float:
        return float((probs[unlabeled].argmax(1) == hidden[unlabeled]).float().mean())

    seeds = torch.zeros(len(hidden), 10)
    seeds[subset.labeled, hidden[subset.labeled]] = 1.0
    graph = knn_graph(features(model, splits.train_images, splits.normalize))
    own = pool[0].softmax(1)
    ensemble = torch.stack([logits.softmax(1) for logits in pool]).mean(0)
    rows = [("control (teacher 0)", accuracy(own)), (f"ensemble of {len(pool)} teachers", accuracy(ensemble))]
    for alpha in (0.9, 0.99):
        spread_probs = spread(graph, seeds, alpha)
        rows.append((f"spreading, alpha {alpha}", accuracy(spread_probs)))
        rows.append(
            (f"spreading, alpha {alpha}, averaged with the control", accuracy((spread_probs + own) / 2))
        )
    return rows


if __name__ == "__main__":
    args, seed = sys.argv[1:], 0
    if "--seed" in args:
        at = args.index("--seed")
        seed, args = int(args[at + 1]), args[:at] + args[at + 2 :]
    torch.set_num_threads(1)  # a screen beside the protocol runs: one core
    for arch in args or ["plain", "adaptive"]:
        started = time.monotonic()
        for what, value in screen(arch, seed):
            print(f"{arch} seed {seed}: {what}: {value:.4f}")
        print(f"{arch} seed {seed}: {time.monotonic() - started:.0f} s", flush=True)
