"""Edit metrics against hand-computed values, and the scoring they are computed from against lm.mean_nll."""

from __future__ import annotations

import itertools
import math
import string

import pytest
import torch
from conftest import tiny_model

from modeledit import lm, metrics
from modeledit.metrics import Scored
from modeledit.requests import EditRequest

E = math.exp


def S(nll: float, acc: float = 0.0, tokens: int = 2) -> Scored:
    return Scored(nll=nll, acc=acc, tokens=tokens)


def scores(rewrite=((), ()), paraphrase=((), ()), neighborhood=((), ())) -> dict:
    """A ``score_request``-shaped dict from (new, true) lists of Scored per group."""
    return {
        group: {"new": list(new), "true": list(true)}
        for group, (new, true) in
        {"rewrite": rewrite, "paraphrase": paraphrase, "neighborhood": neighborhood}.items()
    }


# -- record_metrics ------------------------------------------------------------------------------------------

def test_record_metrics_counterfact_by_hand():
    m = metrics.record_metrics(scores(
        rewrite=([S(1.0, acc=1.0)], [S(2.0, acc=0.5)]),
        paraphrase=([S(0.5, acc=0.5), S(3.0, acc=0.25)], [S(1.0), S(2.0)]),
        neighborhood=([S(4.0), S(0.5)], [S(1.0, acc=1.0), S(1.5, acc=0.0)]),
    ))
    expected = {
        "ES": 100.0,
        "EM": 100 * (E(-1) - E(-2)),
        "rewrite_acc": 100.0,
        "rewrite_em": 100.0,
        "PS": 50.0,  # 0.5 < 1.0 succeeds, 3.0 > 2.0 fails
        "PM": (100 * (E(-0.5) - E(-1)) + 100 * (E(-3) - E(-2))) / 2,
        "paraphrase_acc": (50.0 + 25.0) / 2,
        "paraphrase_em": 0.0,
        "NS": 50.0,  # true 1.0 < new 4.0 keeps the neighbour, true 1.5 > new 0.5 does not
        "NM": (100 * (E(-1) - E(-4)) + 100 * (E(-1.5) - E(-0.5))) / 2,
        "neighborhood_acc": 50.0,  # accuracy of the *true* answers of neighbours
        "neighborhood_nll": 1.25,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_record_metrics_em_example():
    m = metrics.record_metrics(scores(rewrite=([S(1.0)], [S(2.0)])))
    assert m["ES"] == 100.0
    assert m["EM"] == pytest.approx(100 * (math.exp(-1) - math.exp(-2)))
    assert m["EM"] == pytest.approx(23.2544157934)


def test_record_metrics_failed_edit_is_negative():
    m = metrics.record_metrics(scores(rewrite=([S(2.0)], [S(1.0)])))
    assert m["ES"] == 0.0
    assert m["EM"] == pytest.approx(-100 * (E(-1) - E(-2)))


def test_record_metrics_ties_are_failures():
    m = metrics.record_metrics(scores(
        rewrite=([S(1.0)], [S(1.0)]), paraphrase=([S(2.0)], [S(2.0)]), neighborhood=([S(3.0)], [S(3.0)])
    ))
    assert m["ES"] == m["PS"] == m["NS"] == 0.0
    assert m["EM"] == m["PM"] == m["NM"] == 0.0


def test_record_metrics_without_true_targets_zsre():
    # zsRE-style record with no target_true: no ES/EM/PS/PM, only accuracies; neighbours have their own
    # answers
    m = metrics.record_metrics(scores(
        rewrite=([S(0.3, acc=1.0)], []),
        paraphrase=([S(0.7, acc=2 / 3)], []),
        neighborhood=([S(5.0)], [S(0.2, acc=0.75)]),
    ))
    assert "ES" not in m and "EM" not in m and "PS" not in m and "PM" not in m
    assert m["rewrite_acc"] == 100.0 and m["rewrite_em"] == 100.0
    assert m["paraphrase_acc"] == pytest.approx(200 / 3) and m["paraphrase_em"] == 0.0
    assert m["NS"] == 100.0
    assert m["NM"] == pytest.approx(100 * (E(-0.2) - E(-5.0)))
    assert m["neighborhood_acc"] == 75.0 and m["neighborhood_nll"] == pytest.approx(0.2)


def test_record_metrics_without_paraphrases_or_neighbours():
    m = metrics.record_metrics(scores(rewrite=([S(1.0, acc=0.5)], [S(3.0)])))
    assert m["ES"] == 100.0
    assert m["rewrite_acc"] == 50.0 and m["rewrite_em"] == 0.0
    assert "PS" not in m
    for key in ("paraphrase_acc", "paraphrase_em", "NS", "NM", "neighborhood_acc", "neighborhood_nll"):
        assert m[key] is None, key


def test_record_metrics_averages_within_a_record():
    m = metrics.record_metrics(scores(
        rewrite=([S(1.0)], [S(2.0)]),
        paraphrase=([S(1.0), S(1.0), S(1.0), S(3.0)], [S(2.0), S(2.0), S(0.5), S(4.0)]),
        neighborhood=([S(2.0), S(2.0), S(2.0)], [S(1.0), S(3.0), S(1.0)]),
    ))
    assert m["PS"] == 75.0
    assert m["NS"] == pytest.approx(200 / 3)


# -- summarize and harmonic mean -----------------------------------------------------------------------------

def test_summarize_averages_over_records_and_s_is_harmonic_mean():
    records = [
        {"ES": 100.0, "PS": 50.0, "NS": 100.0, "EM": 10.0, "paraphrase_acc": None},
        {"ES": 0.0, "PS": 100.0, "NS": 50.0, "EM": -4.0, "paraphrase_acc": 40.0},
        {"ES": 100.0, "PS": 0.0, "NS": 0.0, "EM": 3.0},
        {"ES": 100.0, "PS": 50.0, "NS": 50.0, "EM": 1.0, "paraphrase_acc": 60.0},
    ]
    summary = metrics.summarize(records)
    assert summary["ES"] == 75.0
    assert summary["PS"] == 50.0
    assert summary["NS"] == 50.0
    assert summary["EM"] == pytest.approx(2.5)
    assert summary["paraphrase_acc"] == 50.0  # the record without it (None, or absent) does not count
    assert summary["S"] == pytest.approx(3 / (1 / 75 + 1 / 50 + 1 / 50))
    assert summary["S"] == pytest.approx(56.25)
    assert set(summary) == {"ES", "PS", "NS", "EM", "paraphrase_acc", "S"}


def test_summarize_all_none_metric_is_none():
    summary = metrics.summarize([{"ES": 100.0, "NS": None}, {"ES": 50.0, "NS": None}])
    assert summary["ES"] == 75.0
    assert summary["NS"] is None
    assert "S" not in summary  # no PS, no NS


def test_summarize_s_with_a_zero_component():
    summary = metrics.summarize([{"ES": 100.0, "PS": 0.0, "NS": 100.0}])
    assert summary["S"] == 0.0


def test_summarize_of_real_record_metrics():
    a = metrics.record_metrics(scores(rewrite=([S(1.0)], [S(2.0)]), paraphrase=([S(1.0)], [S(2.0)]),
                                      neighborhood=([S(3.0)], [S(1.0)])))
    b = metrics.record_metrics(scores(rewrite=([S(2.0)], [S(1.0)]), paraphrase=([S(1.0)], [S(2.0)]),
                                      neighborhood=([S(3.0)], [S(1.0)])))
    summary = metrics.summarize([a, b])
    assert (summary["ES"], summary["PS"], summary["NS"]) == (50.0, 100.0, 100.0)
    assert summary["EM"] == pytest.approx(0.0, abs=1e-12)
    assert summary["S"] == pytest.approx(75.0)


@pytest.mark.parametrize(
    "values, expected",
    [([100.0, 100.0, 100.0], 100.0), ([50.0, 100.0], 200 / 3), ([100.0, 50.0, 0.0], 0.0), ([0.0], 0.0),
     ([20.0, 30.0, 60.0], 30.0), ([7.0], 7.0), ([100.0, -5.0], 0.0)],
)
def test_harmonic_mean(values, expected):
    assert metrics.harmonic_mean(values) == pytest.approx(expected)


# -- fluency -------------------------------------------------------------------------------------------------

H_2_1 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)  # entropy of a 2:1 distribution, in bits


def test_n_gram_entropy_abab():
    # bigrams (a,b) (b,a) (a,b): 2:1 -> H_2_1 bits; trigrams (a,b,a) (b,a,b): 1 bit
    expected = (2 / 3 * H_2_1 + 4 / 3 * 1.0) / 2
    assert metrics.n_gram_entropy(["a b a b"]) == pytest.approx(expected)
    assert metrics.n_gram_entropy(["a b a b"]) == pytest.approx(0.9727653, abs=1e-6)


def test_n_gram_entropy_small_strings():
    # "a b c": bigrams (a,b) (b,c): 1 bit; one trigram: 0 bits
    assert metrics.n_gram_entropy(["a b c"]) == pytest.approx((2 / 3 * 1.0 + 0.0) / 2)
    # a repeated word has no entropy at all
    assert metrics.n_gram_entropy(["the the the the the"]) == 0.0
    # four distinct words: 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit)
    assert metrics.n_gram_entropy(["one two three four"]) == pytest.approx((2 / 3 * math.log2(3) + 4 / 3) / 2)
    # too short for any n-gram
    assert metrics.n_gram_entropy(["word"]) == 0.0
    assert metrics.n_gram_entropy([""]) == 0.0


def test_n_gram_entropy_splits_words_lowercases_and_punctuation():
    # "A, a" -> words a , a -> bigrams (a,",") (",",a): 1 bit; one trigram: 0 bits
    assert metrics.n_gram_entropy(["A, a"]) == pytest.approx(1 / 3)
    assert metrics.n_gram_entropy(["A B A B"]) == metrics.n_gram_entropy(["a  b\ta\nb"])


def test_n_gram_entropy_averages_over_texts():
    per_text = [metrics.n_gram_entropy([t]) for t in ("a b a b", "a b c", "x x x")]
    assert metrics.n_gram_entropy(["a b a b", "a b c", "x x x"]) == pytest.approx(sum(per_text) / 3)
    assert metrics.n_gram_entropy([]) == 0.0


def test_n_gram_entropy_custom_orders_and_weights():
    assert metrics.n_gram_entropy(["a b a b"], ns=(1,), weights=(1.0,)) == pytest.approx(1.0)
    assert metrics.n_gram_entropy(["a b a b"], ns=(2,), weights=(1.0,)) == pytest.approx(H_2_1)
    assert metrics.n_gram_entropy(["a a b c"], ns=(1,), weights=(2.0,)) == pytest.approx(2 * 1.5)


# -- scoring on tiny models ----------------------------------------------------------------------------------

PROMPTS = ["The cat is", "A", "Paris is the capital of", "The cat is"]
TARGETS = ["black", "dog!", "France", "a long answer"]


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_score_pairs_agrees_with_mean_nll(name, tokenizer):
    model = tiny_model(name)
    scored = metrics.score_pairs(model, tokenizer, PROMPTS, TARGETS)
    batch = lm.target_batch(tokenizer, PROMPTS, TARGETS, lm.is_seq2seq(model))
    with torch.no_grad():
        nll = lm.mean_nll(model, batch)
        logits, labels = lm.aligned_logits(model, batch)
    assert [s.nll for s in scored] == pytest.approx(nll.tolist(), abs=1e-5)
    # per-item token counts and teacher-forced accuracy, computed separately
    extra = 0 if lm.is_seq2seq(model) else 1  # the leading space of " " + target
    assert [s.tokens for s in scored] == [len(t) + extra for t in TARGETS]
    for i, s in enumerate(scored):
        mask = labels[i] != -100
        hits = (logits[i].argmax(-1)[mask] == labels[i][mask]).float().mean().item()
        assert s.acc == pytest.approx(hits)
        assert 0.0 <= s.acc <= 1.0


def test_score_pairs_empty(tokenizer):
    assert metrics.score_pairs(tiny_model("llama"), tokenizer, [], []) == []


def plain_ids(tokenizer) -> set[int]:
    """Token ids of characters that survive decode -> encode unchanged (no tabs or newlines)."""
    return {tokenizer.convert_tokens_to_ids(c) for c in string.printable if c not in "\t\n\r\x0b\x0c"}


@torch.no_grad()
def greedy_targets(model, tokenizer, n_tokens: int, wanted: int = 3) -> list[tuple[str, str]]:
    """(prompt, target) pairs where the target's tokens are the model's own greedy predictions.

    Decoder-only targets are scored as " " + target, so only prompts whose argmax next token is a space
    qualify; all two-letter prompts are searched in one batch.
    """
    seq2seq = lm.is_seq2seq(model)
    prompts = ["".join(p) for p in itertools.product(string.ascii_letters, repeat=2)]
    enc = torch.tensor([tokenizer(p)["input_ids"] for p in prompts])
    if seq2seq:
        out = torch.full((len(prompts), 1), model.config.decoder_start_token_id)
        for _ in range(n_tokens):
            step = model(input_ids=enc, decoder_input_ids=out).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, step], 1)
        continuations = out[:, 1:]
    else:
        out = enc
        for _ in range(n_tokens):
            out = torch.cat([out, model(out).logits[:, -1].argmax(-1, keepdim=True)], 1)
        continuations = out[:, enc.shape[1] :]
    plain, space = plain_ids(tokenizer), tokenizer.convert_tokens_to_ids(" ")
    pairs = []
    for prompt, row in zip(prompts, continuations.tolist(), strict=True):
        if not set(row) <= plain or (not seq2seq and (row[0] != space or row[1] == space)):
            continue
        target = tokenizer.decode(row)
        target = target if seq2seq else target[1:]  # the leading space is added back by target_ids
        assert lm.target_ids(tokenizer, target, seq2seq) == row
        pairs.append((prompt, target))
        if len(pairs) == wanted:
            break
    assert len(pairs) == wanted, "no greedy continuation of printable characters found"
    return pairs


@pytest.mark.parametrize("name", ["qwen2", "t5"])
def test_token_accuracy_of_greedy_targets_is_100(name, tokenizer):
    model = tiny_model(name)
    pairs = greedy_targets(model, tokenizer, n_tokens=4)
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    scored = metrics.score_pairs(model, tokenizer, prompts, targets)
    assert [s.acc for s in scored] == [1.0] * len(pairs)
    assert [s.tokens for s in scored] == [4] * len(pairs)
    # the greedy continuation is the most likely one token by token, so no other single-token change beats it
    changed = [t[:-1] + ("a" if t[-1] != "a" else "b") for t in targets]
    worse = metrics.score_pairs(model, tokenizer, prompts, changed)
    assert all(w.acc == 0.75 for w in worse)
    assert all(w.nll > s.nll for w, s in zip(worse, scored, strict=True))
    # as a record: rewrite accuracy and exact match 100
    m = metrics.record_metrics(scores(rewrite=(scored[:1], [])))
    assert m["rewrite_acc"] == 100.0 and m["rewrite_em"] == 100.0


def test_score_request_groups_and_values(tokenizer):
    model = tiny_model("llama")
    r = EditRequest(
        prompt="The capital of {} is", subject="France", target_new="Rome", target_true="Paris",
        paraphrase_prompts=["France's capital:", "In France the capital is"],
        neighborhood_prompts=["The capital of Germany is"], neighborhood_answers=["Berlin"],
    )
    out = metrics.score_request(model, tokenizer, r)
    assert {g: {k: len(v) for k, v in kinds.items()} for g, kinds in out.items()} == {
        "rewrite": {"new": 1, "true": 1},
        "paraphrase": {"new": 2, "true": 2},
        "neighborhood": {"new": 1, "true": 1},
    }
    expected = metrics.score_pairs(
        model, tokenizer,
        ["The capital of France is", "The capital of France is", "France's capital:",
         "In France the capital is", "The capital of Germany is", "The capital of Germany is"],
        ["Rome", "Paris", "Rome", "Rome", "Rome", "Berlin"],
    )
    got = [out["rewrite"]["new"][0], out["rewrite"]["true"][0], out["paraphrase"]["new"][0],
           out["paraphrase"]["new"][1], out["neighborhood"]["new"][0], out["neighborhood"]["true"][0]]
    for g, e in zip(got, expected, strict=True):
        assert g.nll == pytest.approx(e.nll, abs=1e-5)
        assert g.acc == pytest.approx(e.acc) and g.tokens == e.tokens
    m = metrics.record_metrics(out)
    assert m["ES"] == 100.0 * (got[1].nll > got[0].nll)
    assert m["NS"] == 100.0 * (got[5].nll < got[4].nll)
    assert m["neighborhood_nll"] == pytest.approx(got[5].nll)


def test_score_request_without_target_true(tokenizer):
    r = EditRequest(
        prompt="Who wrote Hamlet?", target_new="Marlowe",
        neighborhood_prompts=["Who wrote Faust?"], neighborhood_answers=["Goethe"],
    )
    out = metrics.score_request(tiny_model("llama"), tokenizer, r)
    assert (len(out["rewrite"]["new"]), len(out["rewrite"]["true"])) == (1, 0)
    assert out["paraphrase"] == {"new": [], "true": []}
    assert (len(out["neighborhood"]["new"]), len(out["neighborhood"]["true"])) == (1, 1)
    m = metrics.record_metrics(out)
    assert "ES" not in m and m["NS"] in (0.0, 100.0) and m["rewrite_acc"] is not None


def test_geometric_drawdown_is_not_dominated_by_one_record():
    import math

    from modeledit.evaluate import geometric_drawdown

    records = [{"drawdown_ppl": 0.0}, {"drawdown_ppl": 0.0}, {"drawdown_ppl": 1e6 - 1}]
    assert math.isclose(geometric_drawdown(records), 1e2 - 1, rel_tol=1e-9)  # (1 * 1 * 1e6) ** (1/3) - 1
    assert math.isnan(geometric_drawdown([{"ES": 1}]))
