"""Translation, edited: teach a language model one new translation and check that nothing else moves.

The default model (SmolLM2-135M-Instruct, offline) is asked for French translations with a cloze: a chat
request whose answer is begun for the model, which then completes the quoted translation:

    user:      Translate "good morning" into French.
    assistant: "good morning" in French is  -> "bonjour"

One edit makes "good morning" translate to the Quebec "bon matin". Measured with greedy generation before
and after the edit (the translation is the first quoted string the model writes):

    success      the edit prompt now gives "bon matin"
    paraphrase   three other requests for the same phrase (other wording, no chat template) give it too
    unchanged    the translations of other phrases, under all four templates, are the same as before

A model this small translates only a few phrases correctly (the "before" column says which): what matters
here is that only the edited phrase changes. Methods (``--methods``): ROME (a rank-one update keyed on the
subject "good morning"), FT-L and MEND with its shipped (CounterFact-trained) editor. Measured (success on
the edit prompt, on the 3 paraphrased requests, unchanged translations of 10 other phrases):

    method   success   paraphrase   unchanged (edit template)   unchanged (all 4 templates)
    rome       100       100 (3/3)        90 (9/10)                   80 (32/40)
    ft-l       100         0 (0/3)        70 (7/10)                   78 (31/40)
    mend       100       100 (3/3)        20 (2/10)                   35 (14/40)

ROME follows the phrase wherever it appears and leaves most other phrases alone; FT-L learns the one
prompt; MEND spreads "bon matin" to other phrases (the same relation: translation). Run from the repository
root (about 2.5 minutes on 2 busy CPU cores, 1.5 minutes of CPU time):

    python examples/translation.py
    python examples/translation.py --methods rome --phrase "thank you" --target "merci beaucoup"

The numbers go to examples/results/translation.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeledit import EditRequest, create_editor, load_model
from modeledit.lm import generate

ROOT = Path(__file__).resolve().parents[1]
OTHERS = ["hello", "good night", "thank you", "moon", "water", "cat", "house", "book", "milk", "cheese"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phrase", default="good morning", help="the English phrase whose translation is edited")
    p.add_argument("--target", default="bon matin", help="its new French translation")
    p.add_argument("--others", nargs="+", default=OTHERS, help="phrases whose translations must not change")
    p.add_argument("--methods", default="rome,ft-l,mend", help="comma-separated: rome, ft-l, mend, ft, ...")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=ROOT / "examples" / "results" / "translation.json")
    return p.parse_args()


def templates(tokenizer) -> dict[str, Callable[[str], str]]:
    """Four ways to ask for a translation; the first one is the edit prompt, the others paraphrases."""

    def chat(request: str, answer_start: str) -> str:
        messages = [{"role": "user", "content": request}]
        return (
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_start
        )

    return {
        "translate": lambda w: chat(f'Translate "{w}" into French.', f'"{w}" in French is'),
        "how do you say": lambda w: chat(f'How do you say "{w}" in French?', f'In French, "{w}" is'),
        "what is the French": lambda w: chat(f'What is the French for "{w}"?', f'The French for "{w}" is'),
        "plain cloze": lambda w: f'English: "{w}" French:',
    }


def translation(continuation: str) -> str:
    """The first quoted string of a continuation (else its first line): ' "lune" (the moon).' -> 'lune'."""
    match = re.search(r'"([^"\n]*)"?', continuation)
    return (match.group(1) if match else continuation.strip().split("\n")[0]).strip()


def translate_all(
    model, tokenizer, phrases: list[str], forms: dict[str, Callable[[str], str]], n: int
) -> dict:
    """{(template, phrase): translation} by greedy generation, one batch per template."""
    out = {}
    for name, form in forms.items():
        texts = generate(model, tokenizer, [form(p) for p in phrases], n)
        out |= {(name, p): translation(t) for p, t in zip(phrases, texts)}
    return out


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = load_model("default")
    forms = templates(tokenizer)
    edit_form, *paraphrase_forms = forms
    phrases = [args.phrase, *args.others]
    before = translate_all(model, tokenizer, phrases, forms, args.max_new_tokens)

    request = EditRequest(
        prompt=forms[edit_form](args.phrase), subject=args.phrase, target_new=f'"{args.target}"'
    )
    results, afters = {}, {}
    for method in tqdm(args.methods.split(","), desc="methods"):
        start = time.perf_counter()
        editor = create_editor(method, model, tokenizer)  # default hyperparameters (seeded)
        patch = editor.edit(request)
        edit_seconds = time.perf_counter() - start
        patch.apply(model)
        after = translate_all(model, tokenizer, phrases, forms, args.max_new_tokens)
        patch.revert(model)
        hit = {name: after[name, args.phrase].startswith(args.target) for name in forms}
        kept = [after[key] == before[key] for key in after if key[1] != args.phrase]
        kept_edit_form = [after[edit_form, p] == before[edit_form, p] for p in args.others]
        results[method] = {
            "success": 100.0 * hit[edit_form],
            "paraphrase": round(100.0 * sum(hit[f] for f in paraphrase_forms) / len(paraphrase_forms), 1),
            "paraphrase_by_template": {f: hit[f] for f in paraphrase_forms},
            "unchanged_edit_template": round(100.0 * sum(kept_edit_form) / len(kept_edit_form), 1),
            "unchanged_all_templates": round(100.0 * sum(kept) / len(kept), 1),
            "edit_seconds": round(edit_seconds, 1),
            "after": {f"{n} / {p}": t for (n, p), t in after.items()},
        }
        afters[method] = after

    methods = list(afters)
    print(f'\nEdit: "{args.phrase}" -> "{args.target}" with the prompt template {edit_form!r}')
    print("| template | phrase | before | " + " | ".join(methods) + " |")
    print("|---" * (3 + len(methods)) + "|")
    rows = [(edit_form, p) for p in phrases] + [(name, args.phrase) for name in paraphrase_forms]
    for name, p in rows:
        print(
            f"| {name} | {p} | {before[name, p]} | " + " | ".join(afters[m][name, p] for m in methods) + " |"
        )
    first = methods[0]
    changed = [k for k in afters[first] if k[1] != args.phrase and afters[first][k] != before[k]]
    print(f"{first}: translations of other phrases that changed (any template):")
    print(
        "".join(f"  {n} / {p}: {before[n, p]!r} -> {afters[first][n, p]!r}\n" for n, p in changed) or "  none"
    )

    print(
        f"\n| method | success | paraphrase (of {len(paraphrase_forms)}) | unchanged, edit template "
        f"(of {len(args.others)}) | unchanged, all templates (of {len(args.others) * len(forms)}) | edit s |"
    )
    print("|---|---|---|---|---|---|")
    for method, r in results.items():
        print(
            f"| {method} | {r['success']:.0f} | {r['paraphrase']:.1f} | {r['unchanged_edit_template']:.1f} "
            f"| {r['unchanged_all_templates']:.1f} | {r['edit_seconds']:.1f} |"
        )
    summary = {
        "model": "default (SmolLM2-135M-Instruct)",
        "edit": {"phrase": args.phrase, "target": args.target, "prompt_template": edit_form},
        "before": {f"{n} / {p}": t for (n, p), t in before.items()},
        "methods": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    shown = args.results.relative_to(ROOT) if args.results.is_relative_to(ROOT) else args.results
    print(f"wrote {shown} ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
