"""Experiment (not built into mend): project a MEND update away from the keys of stand-in neighbours.

The edit template is filled with other subjects (SUBJECTS); each edited matrix's right factor R becomes
R (I - K^T (K K^T + lam I)^-1 K), K the stand-ins' layer inputs, so the update leaves them (nearly) unchanged.
Variants: name:lam:last_only:scale:n_subjects, comma-separated; lam is relative to the keys' mean
squared norm.

    python examples/mend_neighbour_projection.py --offset 600 --limit 100 \\
        --variants "base:0:0:2.0:0,p:1.0:0:2.0:8"
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeledit.arch import is_transposed
from modeledit.editor import create_editor
from modeledit.hooks import Trace
from modeledit.lm import text_batch
from modeledit.metrics import record_metrics, score_request, summarize
from modeledit.models import load_model
from modeledit.patch import LowRank
from modeledit.requests import load_requests
from modeledit.stats import forward_until

SUBJECTS = [
    "Barack Obama",
    "Paris",
    "Toyota",
    "the Amazon River",
    "Albert Einstein",
    "Microsoft",
    "Brazil",
    "the Beatles",
    "Harvard University",
    "Mount Everest",
    "Lionel Messi",
    "the BBC",
    "Tokyo",
    "Pablo Picasso",
    "Nokia",
    "the Mona Lisa",
]


@torch.no_grad()
def neighbour_keys(model, tokenizer, template, modules, subjects, last_only):
    """{module: inputs (N, in)} of the stand-in prompts, at every token or at each prompt's last token."""
    batch = text_batch(tokenizer, [template.format(s) for s in subjects])  # right-padded
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with Trace(model, modules, capture_input=True, capture_output=False, detach=True) as tr:
        forward_until(model, modules[-1], inputs)  # no later blocks, no LM head
    mask = batch["attention_mask"].bool()
    last = mask.sum(1) - 1
    keys = {}
    for m in modules:
        x = tr[m].input  # (B, T, in)
        keys[m] = (x[torch.arange(x.shape[0]), last] if last_only else x[mask]).float()
    return keys


def project(right: torch.Tensor, K: torch.Tensor, lam: float) -> torch.Tensor:
    """right (I - K^T (K K^T + lam' I)^-1 K) for right (rank, in), keys K (N, in); lam' = lam x mean |k|^2."""
    G = K @ K.T
    lam_abs = lam * G.diagonal().mean()
    A = torch.linalg.solve(G + lam_abs * torch.eye(G.shape[0]), K)  # (N, in)
    return right - (right @ K.T) @ A


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/counterfact/dev.json"))
    p.add_argument("--offset", type=int, default=500)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--variants", default="shipped:0:0:2.0:0,stand-ins8:1.0:0:2.0:8")
    p.add_argument("--out", type=Path, default=Path("runs/neighbour_projection.json"))
    a = p.parse_args()
    torch.set_grad_enabled(True)  # the editor needs the edit's gradient
    model, tok = load_model("default")
    editor = create_editor("mend", model, tok, alpha_scale=1.0)  # each variant's scale alone
    modules = list(editor.network.shapes)
    variants = []
    for v in a.variants.split(","):
        name, lam, last, scale, n_subjects = v.split(":")
        variants.append((name, float(lam), bool(int(last)), float(scale), int(n_subjects)))
    requests = load_requests(a.data, offset=a.offset, limit=a.limit)
    edited: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    unedited = []
    seconds_keys = 0.0
    for r in tqdm(requests, desc="records"):
        unedited.append(record_metrics(score_request(model, tok, r)))
        patch = editor.edit([r])  # the gradient pass, once per record: low-rank deltas a @ b
        start = time.perf_counter()
        keys = {
            (last, n): neighbour_keys(model, tok, r.template, modules, SUBJECTS[:n], last)
            for _, lam, last, _, n in variants
            if lam > 0
        }
        seconds_keys += time.perf_counter() - start
        for name, lam, last, scale, n in variants:
            deltas = {}
            for pname, d in patch.deltas.items():
                m = pname.removesuffix(".weight")
                transposed = is_transposed(model.get_submodule(m))  # GPT-2 Conv1D: (in, out) storage
                right = d.a.T if transposed else d.b  # (rank, in)
                if lam > 0:
                    right = project(right, keys[last, n][m], lam)
                deltas[pname] = LowRank(scale * right.T, d.b) if transposed else LowRank(scale * d.a, right)
            scaled = replace(patch, deltas=deltas).apply(model)
            try:
                edited[name].append(record_metrics(score_request(model, tok, r)))
            finally:
                scaled.revert(model)
    none_ns = summarize(unedited)["NS"]
    per_record = seconds_keys / len(requests)
    print(f"NS of the unedited model {none_ns:.2f}; stand-in keys {per_record:.3f} s per record")
    rows = {}
    for name, records in edited.items():
        summary = summarize(records)
        rows[name] = {k: summary[k] for k in ("ES", "PS", "NS", "S")}
        print(f"{name:20s} " + " ".join(f"{k} {summary[k]:6.2f}" for k in ("ES", "PS", "NS", "S")))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"NS_unedited": none_ns, "variants": rows, "per_record": {"unedited": unedited} | edited}
    a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
