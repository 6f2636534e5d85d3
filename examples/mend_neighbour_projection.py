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

import torch
from tqdm.auto import tqdm

from modeledit.editor import create_editor
from modeledit.hooks import Trace
from modeledit.methods.mend import gradient_factors
from modeledit.metrics import record_metrics, score_request, summarize
from modeledit.models import load_model
from modeledit.patch import linear_delta
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
    prompts = [template.format(s) for s in subjects]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with Trace(model, modules, capture_input=True, capture_output=False, detach=True) as tr:
        forward_until(
            model, modules[-1], {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        )
    mask = enc["attention_mask"].bool()
    keys = {}
    for m in modules:
        x = tr[m].input  # (B, T, d)
        if last_only:
            # last real token per row (right padding assumed)
            idx = mask.sum(1) - 1
            if tokenizer.padding_side == "left":
                idx = torch.full_like(idx, x.shape[1] - 1)
            keys[m] = x[torch.arange(x.shape[0]), idx].float()
        else:
            keys[m] = x[mask].float()
    return keys


def project(right, K, lam):
    # right: (n, in); K: (N, in) keys. right @ (I - K^T (K K^T + lam I)^-1 K)
    G = K @ K.T
    lam_abs = lam * G.diagonal().mean()
    A = torch.linalg.solve(G + lam_abs * torch.eye(G.shape[0]), K)  # (N, in)
    return right - (right @ K.T) @ A


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--offset", type=int, default=500)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--variants", default="base:0:0:2.0")  # name:lam:last_only:scale,...
    p.add_argument("--nsub", type=int, default=16)
    p.add_argument("--out", default="runs/nbproj.json")
    a = p.parse_args()
    torch.set_grad_enabled(True)
    model, tok = load_model("default")
    editor = create_editor("mend", model, tok, alpha_scale=1.0)
    modules = list(editor.network.shapes)
    variants = []
    for v in a.variants.split(","):
        name, lam, last, scale, nsub = v.split(":")
        variants.append((name, float(lam), bool(int(last)), float(scale), int(nsub)))
    reqs = load_requests("../shared/data/counterfact/dev.json", offset=a.offset, limit=a.limit)
    res = {n: [] for n, *_ in variants}
    unedited = []
    t_keys = 0.0
    for r in tqdm(reqs):
        unedited.append(record_metrics(score_request(model, tok, r)))
        factors = gradient_factors(model, editor.task, [r], modules)
        with torch.no_grad():
            updates = editor.network(factors)
        t0 = time.perf_counter()
        keys = {}
        for lo, ns in {(v[2], v[4]) for v in variants if v[1] > 0}:
            keys[lo, ns] = neighbour_keys(model, tok, r.template, modules, SUBJECTS[:ns], lo)
        t_keys += time.perf_counter() - t0
        patch0 = editor.edit([r])
        for name, lam, last, scale, ns in variants:
            deltas = {}
            for m, (left, right) in updates.items():
                if lam > 0:
                    right = project(right, keys[last, ns][m], lam)
                n, d = linear_delta(model, m, scale * left, right)
                deltas[n] = d
            patch = replace(patch0, deltas=deltas).apply(model)
            try:
                res[name].append(record_metrics(score_request(model, tok, r)))
            finally:
                patch.revert(model)
    print(f"none NS {summarize(unedited)['NS']:.2f}; key time {t_keys / len(reqs):.3f}s/record")
    out = {}
    for name, recs in res.items():
        s = summarize(recs)
        out[name] = {k: s[k] for k in ("ES", "PS", "NS", "S")}
        print(f"{name:20s} " + " ".join(f"{k} {s[k]:6.2f}" for k in ("ES", "PS", "NS", "S")), flush=True)
    json.dump(
        {"none_NS": summarize(unedited)["NS"], "variants": out, "per_record": {"unedited": unedited} | res},
        open(a.out, "w"),
    )


if __name__ == "__main__":
    main()
