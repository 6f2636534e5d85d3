"""Would checking each MEND edit and strengthening the ones that do not hold help? A simulation.

Policy ("verify and boost", not in the MEND paper): edit at the first scale of a ladder, e.g. x1.5 -> x2.0
-> x3.0; if the edit prompt does not yet prefer ``target_new`` over ``target_true`` (by ``margin`` points of
probability), use the next scale, and so on. This script reads the per-record metrics that
``examples/mend_step_scales.py`` writes for global scale candidates named ``xSCALE`` (every matrix scaled
alike) and scores every ladder and margin without editing again:

    python examples/mend_step_scales.py --candidates runs/global_scales.json --base 1.0 --offset 500 \\
        --limit 400 --out runs/global_scales_out.json       # {"x1.0": {}, "x1.5": {"layers.": 1.5}, ...}
    python examples/mend_adaptive_step.py runs/global_scales_out.json

It prints the fixed scales, the best ladders by S, and those that meet the MEND issue's single-edit
targets (ES >= 95, PS >= 80, NS >= unedited - 5) on these records. ``checks`` is the mean number of
verification passes per edit (each one forward pass on the edit prompt with ``target_new`` and
``target_true``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modeledit.metrics import summarize

MARGINS = (0.0, 5.0, 10.0, 20.0)  # EM points: 100 x (p(target_new) - p(target_true)) on the edit prompt


def ladder_records(per_record: dict[str, list[dict]], ladder: list[str], margin: float) -> tuple[list, float]:
    """Each record's metrics at the first scale of ``ladder`` where its edit holds (else the last scale),
    and the mean number of checks per edit (the last scale needs none)."""
    chosen, checks = [], 0
    for i in range(len(per_record["unedited"])):
        pick = ladder[-1]
        for name in ladder[:-1]:
            checks += 1
            if per_record[name][i]["EM"] > margin:
                pick = name
                break
        chosen.append(per_record[pick][i])
    return chosen, checks / len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="output of mend_step_scales.py with xSCALE candidates")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    per_record = json.loads(args.results.read_text())["per_record"]
    order = sorted((n for n in per_record if n != "unedited"), key=lambda n: float(n.removeprefix("x")))
    ns_unedited = summarize(per_record["unedited"])["NS"]
    print(f"{len(per_record['unedited'])} records, NS of the unedited model {ns_unedited:.2f}")
    rows = []
    for first in range(len(order)):
        for last in range(first, len(order)):
            ladder = order[first : last + 1]
            for margin in MARGINS if len(ladder) > 1 else (0.0,):
                records, checks = ladder_records(per_record, ladder, margin)
                s = summarize(records)
                rows.append((s["S"], s["ES"], s["PS"], s["NS"], " -> ".join(ladder), margin, checks))

    def show(row: tuple) -> str:
        return (
            f"S {row[0]:5.2f}  ES {row[1]:5.1f}  PS {row[2]:5.1f}  NS {row[3]:5.1f}  {row[4]}"
            + (f"  (margin {row[5]:g}, checks {row[6]:.2f})" if "->" in row[4] else "")
        )

    print("fixed scales:")
    for row in rows:
        if "->" not in row[4]:
            print("  " + show(row))
    print(f"best {args.top} by S:")
    for row in sorted(rows, reverse=True)[: args.top]:
        print("  " + show(row))
    meeting = [r for r in rows if r[1] >= 95 and r[2] >= 80 and r[3] >= ns_unedited - 5]
    print(f"meeting ES >= 95, PS >= 80, NS >= {ns_unedited - 5:.2f}: {len(meeting)}")
    for row in sorted(meeting, reverse=True)[: args.top]:
        print("  " + show(row))


if __name__ == "__main__":
    main()
