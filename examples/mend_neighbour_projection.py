"""Calibrate MEND's ``protect_neighbours`` / ``protect_ridge`` / ``alpha_scale`` on held-out records.

Each record's update is computed once (no protection, scale 1), then for every variant its right factors are
projected away from that many stand-ins' keys (``MEND.stand_in_prompts``, ``StandIns.keys``,
``project_away``), scaled, applied, scored and removed. Variants: name:ridge:scale:n_subjects,
comma-separated.

    python examples/mend_neighbour_projection.py --offset 600 --limit 100 \\
        --variants "paper:1.0:2.0:0,n8:1.0:2.0:8"
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
from modeledit.metrics import record_metrics, score_request, summarize
from modeledit.models import load_model
from modeledit.patch import LowRank
from modeledit.requests import load_requests
from modeledit.stand_ins import project_away


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/counterfact/dev.json"))
    p.add_argument("--offset", type=int, default=500)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--variants", default="paper:1.0:2.5:0,stand-ins16:1.0:2.5:16")
    p.add_argument("--out", type=Path, default=Path("runs/neighbour_projection.json"))
    a = p.parse_args()
    torch.set_grad_enabled(True)  # the editor needs the edit's gradient
    model, tok = load_model("default")
    editor = create_editor("mend", model, tok, alpha_scale=1.0, protect_neighbours=0)  # variants add both
    variants = []
    for v in a.variants.split(","):
        name, ridge, scale, n_subjects = v.split(":")
        variants.append((name, float(ridge), float(scale), int(n_subjects)))
    requests = load_requests(a.data, offset=a.offset, limit=a.limit)
    edited: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    unedited = []
    seconds_keys = 0.0
    for r in tqdm(requests, desc="records"):
        unedited.append(record_metrics(score_request(model, tok, r)))
        patch = editor.edit([r])  # the gradient pass, once per record: low-rank deltas a @ b
        start = time.perf_counter()
        keys = {}
        for n in {n for *_, n in variants if n > 0}:
            editor.config.protect_neighbours = n
            keys[n] = editor.stand_ins.keys(editor.stand_in_prompts([r]), list(editor.network.shapes))
        editor.config.protect_neighbours = 0
        seconds_keys += time.perf_counter() - start
        for name, ridge, scale, n in variants:
            deltas = {}
            for pname, d in patch.deltas.items():
                m = pname.removesuffix(".weight")
                transposed = is_transposed(model.get_submodule(m))  # GPT-2 Conv1D: (in, out) storage
                right = d.a.T if transposed else d.b  # (rank, in)
                if n > 0:
                    right = project_away(right, keys[n][m], ridge)
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
