"""Edit a grid-world policy when the world changes in one place: lava appears on its path.

A small MLP policy is trained by imitation of the optimal policy (value iteration) of an 8x8 grid world
and reaches the goal from every cell. Then lava appears on one cell of its usual route. Near the lava the
old policy now acts wrongly (it walks into the lava, or towards it), everywhere else it is still optimal.
We edit the policy with modeledit:

- the edit: the cells next to the lava where the old policy is now wrong, with the new optimal actions;
- the equivalent situations (measured, not edited): the other cells whose action must change;
- locality: every other cell must keep its action; FT-KL gets them as ``locality_inputs`` (the state
  space is small and known), or with --held-out-locality only half (a chessboard's dark squares), the
  other half held out to measure how well locality generalises.

Methods: FT and FT-KL edited on the cells next to the lava, and FT-KL edited on every cell whose action
must change ("ft-kl all"). It reports the actions in those situations, the share of the other cells that
keep their (optimal) action, and the return from every start cell, before and after the edit; first on one
lava cell (with maps of the policy), then averaged over every cell of the policy's route from the start.
The lesson: an edit on the cells next to the lava alone leaves the cells upstream wrong (FT-KL does not
generalise to them; plain FT does, but breaks the rest of the policy). Offline, CPU, under a minute:

    python examples/policy.py                       # defaults: --seed 0 --lava 4,7
    python examples/policy.py --lava 0,5 --held-out-locality

Results go to examples/results/policy.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from modeledit import TensorEdit, create_editor

WORLD = (
    "S.......",
    "........",
    "..###...",
    "....#...",
    "....#...",
    "........",
    "........",
    ".......G",
)
SIZE = len(WORLD)
ACTIONS = [(0, 1), (1, 0), (0, -1), (-1, 0)]  # right, down, left, up (also the tie-breaking order)
ARROWS = ">v<^"
STEP_REWARD, LAVA_REWARD, GOAL_REWARD = -1.0, -20.0, 0.0

Cell = tuple[int, int]

# -- the grid world ---------------------------------------------------------------------------------------


def find(char: str) -> Cell:
    return next((r, c) for r, row in enumerate(WORLD) for c, ch in enumerate(row) if ch == char)


GOAL, START = find("G"), find("S")
WALLS = {(r, c) for r, row in enumerate(WORLD) for c, ch in enumerate(row) if ch == "#"}


def step(cell: Cell, action: int, lava: set[Cell]) -> tuple[Cell, float, bool]:
    """One move; bumping into a wall or the border stays put. Returns (next cell, reward, episode over)."""
    r, c = cell[0] + ACTIONS[action][0], cell[1] + ACTIONS[action][1]
    nxt = (r, c) if 0 <= r < SIZE and 0 <= c < SIZE and (r, c) not in WALLS else cell
    if nxt == GOAL:
        return nxt, GOAL_REWARD, True
    if nxt in lava:
        return nxt, LAVA_REWARD, True
    return nxt, STEP_REWARD, False


def free_cells(lava: set[Cell]) -> list[Cell]:
    """The cells an agent can stand on and act from."""
    return [(r, c) for r in range(SIZE) for c in range(SIZE) if (r, c) not in WALLS | lava | {GOAL}]


@functools.cache
def _optimal_actions(lava: frozenset[Cell]) -> dict[Cell, frozenset[int]]:
    cells = free_cells(set(lava))
    value = {cell: 0.0 for cell in cells}

    def q(cell: Cell, a: int) -> float:
        nxt, reward, done = step(cell, a, set(lava))
        return reward + (0.0 if done else value[nxt])

    while True:  # deterministic shortest paths: converges in at most (number of cells) sweeps
        new = {cell: max(q(cell, a) for a in range(4)) for cell in cells}
        if new == value:
            break
        value = new
    return {cell: frozenset(a for a in range(4) if q(cell, a) >= value[cell] - 1e-9) for cell in cells}


def optimal_actions(lava: set[Cell]) -> dict[Cell, frozenset[int]]:
    """Value iteration (no discount, deterministic moves): the set of optimal actions of every free cell."""
    return _optimal_actions(frozenset(lava))


def rollout(policy: nn.Module, start: Cell, lava: set[Cell], max_steps: int = 4 * SIZE) -> tuple[float, bool]:
    """Greedy episode from ``start``: (return, reached the goal)."""
    cell, total = start, 0.0
    for _ in range(max_steps):
        nxt, reward, done = step(cell, act(policy, [cell])[0], lava)
        total += reward
        if done:
            return total, nxt == GOAL
        cell = nxt
    return total, False


# -- the policy -------------------------------------------------------------------------------------------


def features(cells: list[Cell]) -> torch.Tensor:
    """One-hot row and one-hot column: neighbouring cells share half their input."""
    x = torch.zeros(len(cells), 2 * SIZE)
    for i, (r, c) in enumerate(cells):
        x[i, r], x[i, SIZE + c] = 1.0, 1.0
    return x


@torch.no_grad()
def act(policy: nn.Module, cells: list[Cell]) -> list[int]:
    return policy(features(cells)).argmax(-1).tolist()


def train_policy(seed: int, epochs: int = 1500) -> nn.Module:
    """Imitation of the optimal policy (first optimal action in ACTIONS order) on every free cell."""
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Linear(2 * SIZE, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    best = optimal_actions(set())
    cells = list(best)
    x, y = features(cells), torch.tensor([min(best[c]) for c in cells])
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in tqdm(range(epochs), desc="policy", leave=False):
        loss = F.cross_entropy(policy(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.eval().requires_grad_(False)  # editors never train the model itself


# -- one scenario: lava on one cell ---------------------------------------------------------------------


def measure(policy: nn.Module, lava: set[Cell], groups: dict[str, list[Cell]]) -> dict[str, float]:
    """Accuracy (greedy action is optimal in the lava world) per group of cells; return from every cell."""
    best = optimal_actions(lava)
    out = {}
    for name, cells in groups.items():
        if cells:  # (a lava cell may leave no equivalent situations)
            out[f"{name}_acc"] = 100.0 * statistics.fmean(
                a in best[c] for c, a in zip(cells, act(policy, cells))
            )
    episodes = [rollout(policy, cell, lava) for cell in free_cells(lava)]
    out["mean_return"] = statistics.fmean(r for r, _ in episodes)
    out["reach_goal"] = 100.0 * statistics.fmean(ok for _, ok in episodes)
    out["start_return"] = rollout(policy, START, lava)[0]
    return out


def situations(policy: nn.Module, lava: set[Cell], held_out: bool) -> dict[str, list[Cell]]:
    """The cells next to the lava where the old policy is now wrong (the edit), the other cells where it is
    wrong (equivalent situations) and the rest, where its action is still optimal: FT-KL's locality inputs
    ("locality") and the cells locality is measured on ("other"). Both are all of them, or with
    ``held_out`` split like a chessboard (dark squares: locality inputs; light squares: held out)."""
    best, cells = optimal_actions(lava), free_cells(lava)
    wrong = [c for c, a in zip(cells, act(policy, cells)) if a not in best[c]]
    near = [c for c in wrong if any(abs(c[0] - r) + abs(c[1] - k) == 1 for r, k in lava)]
    return {
        "edit": near,
        "equivalent": [c for c in wrong if c not in near],
        "locality": [c for c in cells if c not in wrong and (not held_out or sum(c) % 2 == 0)],
        "other": [c for c in cells if c not in wrong and (not held_out or sum(c) % 2 == 1)],
    }


def lava_edit(groups: dict[str, list[Cell]], lava: set[Cell], cells: list[Cell]) -> TensorEdit:
    """The new optimal actions on ``cells``; the cells that must not change as locality inputs."""
    best = optimal_actions(lava)
    return TensorEdit(
        features(cells),
        torch.tensor([min(best[c]) for c in cells]),
        locality_inputs=features(groups["locality"]),
    )


METHODS = {  # name: (editor, edited cells)
    "ft": ("ft", ("edit",)),  # the cells next to the lava
    "ft-kl": ("ft-kl", ("edit",)),
    "ft-kl all": ("ft-kl", ("edit", "equivalent")),  # every cell that must change (nothing left to infer)
}


def scenario(policy: nn.Module, lava: set[Cell], args: argparse.Namespace) -> dict | None:
    """Edit the policy for ``lava`` with each of METHODS; None where the old policy needs no edit."""
    groups = situations(policy, lava, args.held_out_locality)
    if not groups["edit"]:
        return None
    changed = groups["edit"] + groups["equivalent"]
    result = {"lava": [list(c) for c in lava], "cells": {k: [list(c) for c in v] for k, v in groups.items()}}
    measured = {k: v for k, v in groups.items() if k != "locality"}
    for name, (method, edited) in {"before": (None, ()), **METHODS}.items():
        patch = None
        if method is not None:
            kl = {"kl_weight": args.kl_weight} if method == "ft-kl" else {}
            editor = create_editor(
                method, policy, task="classification", lr=args.lr, steps=args.steps, seed=args.seed, **kl
            )
            patch = editor.edit(lava_edit(groups, lava, [c for k in edited for c in groups[k]])).apply(policy)
        result[name] = measure(policy, lava, measured)
        result[name]["actions"] = {f"{r},{c}": ARROWS[a] for (r, c), a in zip(changed, act(policy, changed))}
        result[name]["map"] = show(policy, lava, set(changed))
        if patch is not None:
            patch.revert(policy)
    return result


def show(policy: nn.Module, lava: set[Cell], wrong: set[Cell]) -> str:
    """The policy's arrows; lava X, walls #, goal G; a cell whose action is wrong in brackets."""
    best = optimal_actions(lava)
    lines = []
    for r in range(SIZE):
        row = ""
        for c in range(SIZE):
            cell = (r, c)
            if cell in WALLS | lava | {GOAL}:
                row += f" {'#' if cell in WALLS else 'X' if cell in lava else 'G'} "
                continue
            a = act(policy, [cell])[0]
            row += f"[{ARROWS[a]}]" if a not in best[cell] else f" {ARROWS[a]} "
        lines.append(row)
    return "\n".join(lines)


COLUMNS = {"edit_acc": "edit", "equivalent_acc": "equivalent", "other_acc": "kept",
           "reach_goal": "reach goal", "mean_return": "mean return"}  # fmt: skip


def print_table(results: dict[str, dict]) -> None:
    """Accuracies (%) per group of cells, share of start cells that reach the goal, mean return."""
    print(f"{'':8}" + "".join(f"{name:>12}" for name in COLUMNS.values()))
    for method in ("before", *METHODS):
        r = results[method]
        cells = [f"{r[k]:11.0f}%" if k in r else f"{'-':>12}" for k in list(COLUMNS)[:-1]]
        print(f"{method:8}" + "".join(cells) + f"{r['mean_return']:12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lava", type=str, default="4,7", help="row,col of the lava cell shown in detail")
    parser.add_argument("--lr", type=float, default=1e-2, help="FT / FT-KL learning rate")
    parser.add_argument("--steps", type=int, default=300, help="FT / FT-KL steps")
    parser.add_argument("--kl-weight", type=float, default=100.0, help="FT-KL's weight of the locality KL")
    parser.add_argument(
        "--held-out-locality", action="store_true", help="FT-KL sees only half the unchanged cells"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "policy.json")
    args = parser.parse_args()
    start = time.perf_counter()

    policy = train_policy(args.seed)
    clean = measure(policy, set(), {"all": free_cells(set())})
    print(
        f"policy, world without lava: optimal action in {clean['all_acc']:.0f}% of cells, "
        f"reaches the goal from {clean['reach_goal']:.0f}%, return from S {clean['start_return']:.0f}"
    )

    lava = {tuple(int(v) for v in args.lava.split(","))}
    result = scenario(policy, lava, args)
    if result is None:
        raise SystemExit(f"lava at {args.lava}: the policy needs no edit there; pick a cell on its route")
    print(f"\nlava X at {args.lava}; [.] = a wrong action in this world")
    names = ("before", *METHODS)
    print("".join(f"{name:26}" for name in names))
    for lines in zip(*(result[name].pop("map").splitlines() for name in names)):
        print("  ".join(lines))

    best = optimal_actions(lava)
    print("\nactions where they must change (edit: next to the lava, edited; equivalent: the others)")
    for kind in ("edit", "equivalent"):
        for r, c in result["cells"][kind]:
            optimal = "".join(ARROWS[a] for a in sorted(best[(r, c)]))
            acts = "  ".join(f"{m} {result[m]['actions'][f'{r},{c}']}" for m in names)
            print(f"  {kind:10} ({r},{c}) optimal {optimal:3} {acts}")
    print_table(result)

    route, cell = [], START  # every cell of the old policy's route from S: one scenario each
    for _ in range(4 * SIZE):
        cell = step(cell, act(policy, [cell])[0], set())[0]
        if cell == GOAL:
            break
        route.append(cell)
    scenarios = [s for s in (scenario(policy, {c}, args) for c in tqdm(route, desc="lava cells")) if s]
    average = {
        m: {k: statistics.fmean(s[m][k] for s in scenarios if k in s[m]) for k in COLUMNS}
        for m in ("before", *METHODS)
    }
    print(f"\naverage over {len(scenarios)} lava cells on the route from S")
    print_table(average)

    seconds = time.perf_counter() - start
    report = {
        "args": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
        "policy_without_lava": clean,
        "scenario": result,
        "route_average": average | {"lava_cells": [list(s["lava"]) for s in scenarios]},
        "seconds": seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
