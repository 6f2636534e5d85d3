"""Fix an image classifier that errs on one background ("snow"), with a MEND editor trained on other ones.

The MEND lecture's example: an image classifier works on clean images but gets images with one particular
background wrong. Here the classifier is a small CNN on scikit-learn's bundled 8x8 digits, and the failure
is a fixed "snow" background (bright dots on the dark pixels) that it never saw. We

1. train the CNN on clean digits (about 98% test accuracy; with snow, about half are misclassified);
2. meta-train a MEND editor on edits of the same kind with OTHER backgrounds (stripes, checkerboards and
   other dot patterns; never the snow one): each edit is a few images with a background and their true
   labels; other images with that background must follow (generalisation) and clean images must not
   change (locality);
3. edit with a few misclassified snow images and measure: success on the edited images, accuracy on the
   other snow images (generalisation) and the clean test accuracy drawdown; the same for FT and FT-KL.

Every number is averaged over several edits (different snow images). Offline, CPU, about two minutes:

    python examples/image_classifier.py                 # defaults: --seed 0 --edits 10 --k 5
    python examples/image_classifier.py --snow-density 0.35 --snow-intensity 1.0   # a harsher snow

Results go to examples/results/image_classifier.json; the trained editor to runs/examples/ (ignored).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm

from modeledit import TensorEdit, create_editor
from modeledit.editor import Editor
from modeledit.methods.mend import MEND, MENDConfig
from modeledit.training import TrainConfig, tensor_meta_batch, train_editor

ROOT = Path(__file__).resolve().parents[1]  # the repository: trained editors go to ROOT/runs (ignored)
EDITED = ["head.0", "head.2"]  # the classifier's two linear layers (MEND edits linear layers)

# -- data and the classifier --------------------------------------------------------------------------


@dataclass
class Split:
    x: torch.Tensor  # (n, 1, 8, 8) in [0, 1]
    y: torch.Tensor  # (n,) digit labels


def load_splits(seed: int) -> dict[str, Split]:
    """Digits shuffled once: train the CNN / meta-train the editor / test (edits, generalisation, clean)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cuts = {"train": (0, 900), "meta": (900, 1350), "test": (1350, len(y))}
    return {name: Split(x[a:b], y[a:b]) for name, (a, b) in cuts.items()}


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(data: Split, seed: int, epochs: int = 30) -> CNN:
    torch.manual_seed(seed)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in tqdm(range(epochs), desc="classifier", leave=False):
        for batch in torch.randperm(len(data.y)).split(64):
            loss = F.cross_entropy(model(data.x[batch]), data.y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)  # editors never train the model itself


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (model(x).argmax(-1) == y).float().mean().item()


# -- backgrounds --------------------------------------------------------------------------------------


def random_background(rng: np.random.Generator) -> torch.Tensor:
    """A meta-training background (8, 8) in [0, 1]: stripes, a checkerboard or random dots."""
    rows, cols = np.mgrid[0:8, 0:8]
    kind = rng.choice(["rows", "cols", "diagonal", "checker", "dots"])
    period, phase = int(rng.integers(2, 5)), int(rng.integers(0, 4))
    if kind == "rows":
        mask = (rows + phase) % period == 0
    elif kind == "cols":
        mask = (cols + phase) % period == 0
    elif kind == "diagonal":
        mask = (rows + rng.choice([-1, 1]) * cols + phase) % period == 0
    elif kind == "checker":
        size = int(rng.integers(1, 3))
        mask = (rows // size + cols // size + phase) % 2 == 0
    else:
        mask = rng.random((8, 8)) < rng.uniform(0.15, 0.4)
    return torch.tensor(mask * rng.uniform(0.6, 1.0), dtype=torch.float32)


def snow_background(density: float, intensity: float) -> torch.Tensor:
    """The held-out failure: one fixed pattern of bright dots (seeded apart from the meta-training ones)."""
    rng = np.random.default_rng(12345)
    return torch.tensor((rng.random((8, 8)) < density) * intensity, dtype=torch.float32)


def with_background(x: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The background shows where the digit is darker than it (bright dots on the dark pixels)."""
    return torch.maximum(x, background)


# -- meta-training edits --------------------------------------------------------------------------------


def harmful_backgrounds(
    model: nn.Module, data: Split, rng: np.random.Generator, max_acc: float, candidates: int = 1000
) -> list[torch.Tensor]:
    """Random backgrounds; with ``max_acc`` < 100 only those on which the classifier's accuracy (on 100
    images) is below it (failures to fix, like the snow)."""
    backgrounds = [random_background(rng) for _ in range(candidates)]
    x, y = data.x[:100], data.y[:100]
    return [b for b in backgrounds if accuracy(model, with_background(x, b), y) < max_acc]


def background_edit(
    model: nn.Module, data: Split, clean: Split, background: torch.Tensor, rng: np.random.Generator, k: int
) -> TensorEdit:
    """k images with ``background`` (misclassified ones first) and their true labels; 24 other images
    with the same background must follow, 24 clean images must keep their outputs."""
    x = with_background(data.x, background)
    with torch.no_grad():
        wrong = (model(x).argmax(-1) != data.y).numpy()
    order = np.concatenate([rng.permutation(np.flatnonzero(wrong)), rng.permutation(np.flatnonzero(~wrong))])
    edit, rest = order[:k], rng.permutation(order[k:])[:24]
    loc = rng.choice(len(clean.y), 24, replace=False)
    return TensorEdit(
        x[edit], data.y[edit], equivalent_inputs=x[rest], equivalent_targets=data.y[rest],
        locality_inputs=clean.x[loc],
    )  # fmt: skip


def train_mend(
    model: nn.Module, meta: Split, snow: torch.Tensor, args: argparse.Namespace, out_dir: Path
) -> dict:
    config = MENDConfig(
        modules=EDITED, rank=args.rank, lr=args.lr, lr_alpha=args.lr_alpha, alpha_init=args.alpha_init,
        c_edit=args.c_edit, c_loc=args.c_loc, seed=args.seed,
    )  # fmt: skip
    editor = MEND.for_training(model, None, config, task="classification")
    val_rng = np.random.default_rng(args.seed + 1)
    pool = harmful_backgrounds(model, meta, np.random.default_rng(args.seed), args.max_base_acc)
    assert not any(torch.equal(b, snow) for b in pool)  # the test background is never trained on
    val_backgrounds, pool = pool[:16], pool[16:]
    print(f"meta-training on {len(pool)} backgrounds (validation: {len(val_backgrounds)} more)")
    val = [
        tensor_meta_batch([background_edit(model, meta, meta, b, val_rng, args.k)]) for b in val_backgrounds
    ]

    def batch(step: int):
        rng = np.random.default_rng([args.seed, step])  # the same batch for the same step (resumable)
        edits = []
        for _ in range(args.edits_per_batch):
            background = pool[rng.integers(len(pool))]
            edits.append(background_edit(model, meta, meta, background, rng, args.k))
        return tensor_meta_batch(edits)

    train_cfg = TrainConfig(steps=args.steps, val_every=max(1, args.steps // 10), patience=4, log_every=10)
    return train_editor(editor, batch, val, train_cfg, out_dir, progress=True)


# -- evaluation ---------------------------------------------------------------------------------------


def evaluate(
    name: str,
    make_editor: Callable[[], Editor],
    model: nn.Module,
    test: Split,
    snow: torch.Tensor,
    clean_loc: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Edit with k misclassified snow test images, ``args.edits`` times; mean success / generalisation /
    drawdown. Generalisation is the accuracy on every other snow test image."""
    snowy = with_background(test.x, snow)
    with torch.no_grad():
        wrong = np.flatnonzero((model(snowy).argmax(-1) != test.y).numpy())
    clean_before = accuracy(model, test.x, test.y)
    rows = []
    for i in tqdm(range(args.edits), desc=f"edits {name}", leave=False):
        rng = np.random.default_rng([args.seed, 7, i])
        edit = rng.choice(wrong, args.k, replace=False)
        others = np.setdiff1d(np.arange(len(test.y)), edit)
        snow_before = accuracy(model, snowy[others], test.y[others])
        patch = make_editor().edit(TensorEdit(snowy[edit], test.y[edit], locality_inputs=clean_loc))
        patch.apply(model)
        rows.append(
            {
                "success": accuracy(model, snowy[edit], test.y[edit]),
                "snow_before": snow_before,
                "snow_after": accuracy(model, snowy[others], test.y[others]),
                "clean_after": accuracy(model, test.x, test.y),
            }
        )
        patch.revert(model)
    mean = {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}
    return mean | {"drawdown": clean_before - mean["clean_after"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=5, help="images per edit")
    parser.add_argument("--edits", type=int, default=10, help="evaluated edits (different snow images)")
    parser.add_argument("--snow-density", type=float, default=0.25, help="share of background pixels")
    parser.add_argument("--snow-intensity", type=float, default=0.9, help="brightness of the dots (digit: 1)")
    parser.add_argument("--max-base-acc", type=float, default=100.0, help="meta-train only below it")
    parser.add_argument("--steps", type=int, default=600, help="MEND meta-training steps")
    parser.add_argument("--edits-per-batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-alpha", type=float, default=1e-4)
    parser.add_argument("--alpha-init", type=float, default=1e-3)
    parser.add_argument("--c-edit", type=float, default=3.0)
    parser.add_argument("--c-loc", type=float, default=1.0)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--ft-steps", type=int, default=100)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "examples" / "image_classifier")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "image_classifier.json"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    data = load_splits(args.seed)
    model = train_classifier(data["train"], args.seed)
    test, snow = data["test"], snow_background(args.snow_density, args.snow_intensity)
    base = {
        "clean_test_acc": accuracy(model, test.x, test.y),
        "snow_test_acc": accuracy(model, with_background(test.x, snow), test.y),
    }
    print(f"classifier: clean test accuracy {base['clean_test_acc']:.1f}%, snow {base['snow_test_acc']:.1f}%")

    metrics = train_mend(model, data["meta"], snow, args, args.runs / f"mend-seed{args.seed}")
    clean_loc = data["meta"].x[:64]  # FT-KL's locality inputs (clean images, not test images)
    ft = dict(modules=EDITED, lr=args.ft_lr, steps=args.ft_steps, seed=args.seed)
    editors = {
        "mend": lambda: create_editor(
            "mend", model, task="classification", editor_path=str(args.runs / f"mend-seed{args.seed}")
        ),
        "ft": lambda: create_editor("ft", model, task="classification", **ft),
        "ft-kl": lambda: create_editor("ft-kl", model, task="classification", **ft),
    }
    results = {
        name: evaluate(name, make, model, test, snow, clean_loc, args) for name, make in editors.items()
    }

    print(f"\n{args.edits} edits of k={args.k} misclassified snow images each (snow: never meta-trained on)")
    print(f"{'method':8} {'success':>8} {'other snow acc':>16} {'clean acc':>14} {'drawdown':>9}")
    for name, r in results.items():
        print(
            f"{name:8} {r['success']:7.1f}% {r['snow_before']:5.1f} -> {r['snow_after']:5.1f}%   "
            f"{base['clean_test_acc']:5.1f} -> {r['clean_after']:5.1f}% {r['drawdown']:8.2f}"
        )
    m = results["mend"]
    targets = {
        "success>=90": m["success"] >= 90, "generalisation>=70": m["snow_after"] >= 70,
        "drawdown<=1": m["drawdown"] <= 1,
    }  # fmt: skip
    print("targets (MEND):", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    seconds = time.perf_counter() - start
    report = {
        "args": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
        "base": base,
        "mend_training": {
            "steps": metrics["steps"],
            "seconds": metrics["seconds"],
            "best_val": metrics["best_val"],
        },
        "results": results,
        "targets_met": targets,
        "seconds": seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
