"""Calibrate a MEND editor's step sizes per edited matrix on held-out edits.

A trained editor's update for one matrix is -alpha_l x scale x sum_t delta~_t u~_t^T; ``alpha_scale`` may be
one number or one per matrix (``{module: scale}``). This script scores candidate scale settings on
calibration records (never the records you report) in one pass: each record's update is computed once and
then scaled per candidate, applied as a patch, scored (CounterFact ES / PS / NS) and reverted. A candidate
maps substrings of module names to factors, multiplied where several match, on top of ``--base``:

    {"base": {}, "late blocks down": {"layers.28.": 0.75, "layers.29.": 0.75}, "up x0.5": {"up_proj": 0.5}}

It prints ES, PS, NS and S (harmonic mean) per candidate and writes them, with each candidate's
``alpha_scale`` dictionary and every record's metrics, to ``--out``. Run from the repository root, for the
shipped editor:

    python examples/mend_step_scales.py --candidates runs/candidates.json --offset 500 --limit 500 \\
        --out runs/step_scales.json
    modeledit eval --method mend --set 'alpha_scale={"model.layers.27.mlp.up_proj": 2.0, ...}' ...

About 6 s per record for 15 candidates on one CPU core with the default model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeledit.editor import create_editor
from modeledit.metrics import record_metrics, score_request, summarize
from modeledit.models import load_model
from modeledit.requests import load_requests


def candidate_scales(rule: dict[str, float], modules: list[str], base: float) -> dict[str, float]:
    """{module: scale}: ``base`` times every factor of ``rule`` whose key is part of the module's name."""
    scales = {}
    for module in modules:
        scale = base
        for part, factor in rule.items():
            if part in module:
                scale *= factor
        scales[module] = scale
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=Path, required=True, help="JSON: name -> {substring: factor}")
    parser.add_argument("--model", default="default")
    parser.add_argument("--editor", default=None, help="trained editor folder (default: the shipped one)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/counterfact/dev.json"))
    parser.add_argument("--offset", type=int, default=500)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--base", type=float, default=1.0, help="scale of every matrix before the factors")
    parser.add_argument("--out", type=Path, default=Path("runs/step_scales.json"))
    args = parser.parse_args()

    candidates = json.loads(args.candidates.read_text())
    torch.set_grad_enabled(True)  # the editor needs the edit's gradient
    model, tokenizer = load_model(args.model)
    # scale 1: each candidate's scales multiply the learned step sizes alone
    editor = create_editor("mend", model, tokenizer, editor_path=args.editor, alpha_scale=1.0)
    modules = list(editor.network.shapes)
    scales = {name: candidate_scales(rule, modules, args.base) for name, rule in candidates.items()}
    unedited: list[dict] = []
    edited: dict[str, list[dict]] = {name: [] for name in candidates}
    requests = load_requests(args.data, offset=args.offset, limit=args.limit)
    for request in tqdm(requests, desc="records"):
        unedited.append(record_metrics(score_request(model, tokenizer, request)))
        patch = editor.edit([request])  # the gradient pass, once per record
        for name, scale in scales.items():
            deltas = {p: scale[p.removesuffix(".weight")] * patch.dense(p) for p in patch.deltas}
            scaled = replace(patch, deltas=deltas).apply(model)
            try:
                edited[name].append(record_metrics(score_request(model, tokenizer, request)))
            finally:
                scaled.revert(model)
    n, unedited_ns = len(requests), summarize(unedited)["NS"]
    rows = {}
    last = args.offset + n - 1
    print(f"{n} records ({args.offset}-{last}); NS of the unedited model {unedited_ns:.2f}")
    for name, records in edited.items():
        summary = summarize(records)
        row = {key: summary[key] for key in ("ES", "PS", "NS", "S")}
        rows[name] = row | {"alpha_scale": scales[name]}
        print(f"{name:40s} " + "  ".join(f"{key} {row[key]:6.2f}" for key in ("ES", "PS", "NS", "S")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "records": [args.offset, args.offset + n],
        "NS_unedited": unedited_ns,
        "candidates": rows,
        "per_record": {"unedited": unedited} | edited,  # record_metrics per record, for other analyses
    }
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
