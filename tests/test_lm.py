"""Teacher-forced scoring: batches, the NLL every metric uses, functional parameter substitution, KL,
generate."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, SEQ2SEQ, tiny_model

from modeledit import lm

DECODERS = [a for a in ARCHITECTURES if a not in SEQ2SEQ]
PROMPTS = ["The cat is", "A", "Paris is the capital of"]
TARGETS = ["black", "dog!", "France"]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def t5():
    return tiny_model("t5")


# -- batches -------------------------------------------------------------------------------------------------

def test_char_tokenizer_is_one_token_per_character(tokenizer):
    assert len(ids(tokenizer, "The cat is black")) == len("The cat is black")
    assert tokenizer("abc")["input_ids"] == ids(tokenizer, "abc")  # no special tokens


def test_target_and_prompt_ids(tokenizer):
    assert lm.target_ids(tokenizer, "black") == ids(tokenizer, " black")
    assert lm.target_ids(tokenizer, " black") == ids(tokenizer, " black")  # no second space
    assert lm.target_ids(tokenizer, "black", seq2seq=True) == ids(tokenizer, "black")
    assert lm.prompt_ids(tokenizer, "The cat is  ") == ids(tokenizer, "The cat is")


def test_target_batch_decoder_only(tokenizer):
    batch = lm.target_batch(tokenizer, PROMPTS, TARGETS)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_lengths"}
    width = max(len(p) + 1 + len(t) for p, t in zip(PROMPTS, TARGETS, strict=True))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["prompt_lengths"].tolist() == [len(p) for p in PROMPTS]
    pad = tokenizer.pad_token_id
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS, strict=True)):
        n = len(p) + 1 + len(t)
        target = ids(tokenizer, " " + t)
        assert batch["input_ids"][i].tolist() == ids(tokenizer, p + " " + t) + [pad] * (width - n)
        assert batch["labels"][i].tolist() == [-100] * len(p) + target + [-100] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)  # right padding
        # the labels after the prompt are exactly the target's tokens, " " + target
        assert batch["labels"][i, len(p) : n].tolist() == batch["input_ids"][i, len(p) : n].tolist() == target


def test_target_batch_strips_prompt_spaces_and_keeps_target_space(tokenizer):
    a = lm.target_batch(tokenizer, ["The cat is "], ["black"])
    b = lm.target_batch(tokenizer, ["The cat is"], [" black"])
    for key in a:
        assert torch.equal(a[key], b[key])
    assert tokenizer.decode(a["input_ids"][0]) == "The cat is black"


def test_target_batch_seq2seq(tokenizer):
    batch = lm.target_batch(tokenizer, PROMPTS, TARGETS, seq2seq=True)
    enc_width, dec_width = max(map(len, PROMPTS)), max(map(len, TARGETS))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, enc_width)
    assert batch["labels"].shape == (3, dec_width)
    assert batch["prompt_lengths"].tolist() == [len(p) for p in PROMPTS]
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS, strict=True)):
        assert batch["input_ids"][i].tolist() == ids(tokenizer, p) + [0] * (enc_width - len(p))
        assert batch["attention_mask"][i].tolist() == [1] * len(p) + [0] * (enc_width - len(p))
        assert batch["labels"][i].tolist() == ids(tokenizer, t) + [-100] * (dec_width - len(t))


def test_model_inputs(tokenizer):
    batch = lm.target_batch(tokenizer, PROMPTS, TARGETS)
    assert set(lm.model_inputs(batch, seq2seq=False)) == {"input_ids", "attention_mask"}
    assert set(lm.model_inputs(batch, seq2seq=True)) == {"input_ids", "attention_mask", "labels"}


def test_text_batch(tokenizer):
    batch = lm.text_batch(tokenizer, ["hello", "a somewhat longer text"], max_length=8)
    assert batch["input_ids"][0].tolist() == ids(tokenizer, "hello") + [0] * 3
    assert batch["input_ids"][1].tolist() == ids(tokenizer, "a somewh")
    assert batch["labels"][0].tolist() == ids(tokenizer, "hello") + [-100] * 3
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 8]
    assert batch["prompt_lengths"].tolist() == [0, 0]


def test_is_seq2seq(llama, t5):
    assert not lm.is_seq2seq(llama)
    assert lm.is_seq2seq(t5)


# -- NLL -----------------------------------------------------------------------------------------------------

def manual_decoder_nll(model, tokenizer, prompt, target):
    """Mean NLL of " " + target after prompt, from one unpadded forward pass."""
    p, t = ids(tokenizer, prompt), ids(tokenizer, " " + target)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].double(), -1)
    return -sum(logp[len(p) + j - 1, tok].item() for j, tok in enumerate(t)) / len(t)


def manual_seq2seq_nll(model, tokenizer, prompt, target):
    p, t = ids(tokenizer, prompt), ids(tokenizer, target)
    decoder_input = [model.config.decoder_start_token_id] + t[:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p]), decoder_input_ids=torch.tensor([decoder_input])).logits
    logp = torch.log_softmax(logits[0].double(), -1)
    return -sum(logp[j, tok].item() for j, tok in enumerate(t)) / len(t)


def test_mean_nll_matches_manual_llama(llama, tokenizer):
    batch = lm.target_batch(tokenizer, PROMPTS, TARGETS)
    with torch.no_grad():
        nll = lm.mean_nll(llama, batch)
    assert nll.shape == (3,)
    expected = [manual_decoder_nll(llama, tokenizer, p, t) for p, t in zip(PROMPTS, TARGETS, strict=True)]
    assert nll.tolist() == pytest.approx(expected, abs=1e-4)
    assert all(0 < x < 20 for x in expected)


@pytest.mark.parametrize("name", DECODERS)
def test_mean_nll_matches_manual_every_decoder(name, tokenizer):
    model = tiny_model(name)
    prompts, targets = ["Hi", "The cat is on the"], ["a long answer", "mat"]
    with torch.no_grad():
        nll = lm.mean_nll(model, lm.target_batch(tokenizer, prompts, targets))
    expected = [manual_decoder_nll(model, tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    assert nll.tolist() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_mean_nll_matches_manual_seq2seq(name, tokenizer):
    model = tiny_model(name)
    batch = lm.target_batch(tokenizer, PROMPTS, TARGETS, seq2seq=True)
    with torch.no_grad():
        nll = lm.mean_nll(model, batch)
    expected = [manual_seq2seq_nll(model, tokenizer, p, t) for p, t in zip(PROMPTS, TARGETS, strict=True)]
    assert nll.tolist() == pytest.approx(expected, abs=1e-4)


def test_mean_nll_of_one_item_does_not_depend_on_the_batch(llama, tokenizer):
    with torch.no_grad():
        alone = lm.mean_nll(llama, lm.target_batch(tokenizer, PROMPTS[:1], TARGETS[:1]))
        batched = lm.mean_nll(llama, lm.target_batch(tokenizer, PROMPTS, TARGETS))
    assert alone.item() == pytest.approx(batched[0].item(), abs=1e-5)


def test_token_logprobs_mask(llama, tokenizer):
    batch = lm.target_batch(tokenizer, PROMPTS, TARGETS)
    with torch.no_grad():
        logp, mask = lm.token_logprobs(llama, batch)
    assert mask.sum(-1).tolist() == [len(t) + 1 for t in TARGETS]
    assert torch.all(logp[~mask] == 0) and torch.all(logp[mask] < 0)


def test_aligned_logits_predict_labels(llama, tokenizer):
    batch = lm.target_batch(tokenizer, ["abc"], ["d"])
    logits, labels = lm.aligned_logits(llama, batch)
    assert logits.shape[:2] == labels.shape
    full = llama(batch["input_ids"]).logits
    (pos,) = (labels[0] != -100).nonzero()[0].tolist()
    assert labels[0, pos].item() == tokenizer.convert_tokens_to_ids(" ")
    # the logits aligned with the first target label are those of the prompt's last token ("c")
    assert torch.allclose(logits[0, pos], full[0, 2], atol=1e-5)


# -- functional parameter substitution -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, weight",
    [("llama", "model.layers.0.mlp.down_proj.weight"), ("gpt2", "transformer.h.1.mlp.c_proj.weight"),
     ("t5", "decoder.block.0.layer.2.DenseReluDense.wo.weight"), ("llama", "model.embed_tokens.weight")],
)
def test_forward_with_params_equals_setting_the_weight(name, weight, tokenizer):
    model = tiny_model(name)
    seq2seq = lm.is_seq2seq(model)
    batch = lm.target_batch(tokenizer, PROMPTS, TARGETS, seq2seq=seq2seq)
    inputs = lm.model_inputs(batch, seq2seq)
    original = dict(model.named_parameters())[weight].detach().clone()
    torch.manual_seed(1)
    new = (original + 0.5 * torch.randn_like(original)).requires_grad_()

    logits = lm.forward(model, inputs, {weight: new}).logits
    edited = copy.deepcopy(model)
    with torch.no_grad():
        dict(edited.named_parameters())[weight].copy_(new)
        expected = edited(**inputs).logits
        before = model(**inputs).logits
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, before, atol=1e-3)  # the substitution changed something
    assert torch.equal(dict(model.named_parameters())[weight], original)  # the model is untouched
    assert torch.allclose(lm.forward(model, inputs).logits, before, atol=1e-5)

    # gradients flow to the substituted tensor, and equal those of the model with the weight set
    loss = lm.mean_nll(model, batch, {weight: new}).sum()
    (grad,) = torch.autograd.grad(loss, new)
    assert grad.abs().sum() > 0
    lm.mean_nll(edited, batch).sum().backward()
    assert torch.allclose(grad, dict(edited.named_parameters())[weight].grad, atol=1e-5)
    with torch.no_grad():
        assert lm.mean_nll(model, batch, {weight: new}) == pytest.approx(lm.mean_nll(edited, batch), abs=1e-5)


def test_forward_without_params_is_the_model(llama, tokenizer):
    inputs = lm.model_inputs(lm.target_batch(tokenizer, PROMPTS, TARGETS), False)
    with torch.no_grad():
        assert torch.equal(lm.forward(llama, inputs).logits, llama(**inputs).logits)
        assert torch.equal(lm.forward(llama, inputs, {}).logits, llama(**inputs).logits)


# -- KL ------------------------------------------------------------------------------------------------------

def test_kl_zero_for_identical_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert lm.kl_on_positions(logits, logits.clone(), mask).item() == pytest.approx(0, abs=1e-6)
    # a constant shift of the logits leaves the distribution unchanged
    assert lm.kl_on_positions(logits, logits + 3.0, mask).item() == pytest.approx(0, abs=1e-5)


def test_kl_positive_and_exact():
    torch.manual_seed(0)
    before, after = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    kl = lm.kl_on_positions(before, after, mask).item()
    p, q = torch.softmax(before.double(), -1), torch.softmax(after.double(), -1)
    per_position = (p * (p.log() - q.log())).sum(-1)
    expected = (per_position[0, 0] + per_position[0, 1] + per_position[1, 0]).item() / 3
    assert kl > 0
    assert kl == pytest.approx(expected, rel=1e-5)
    # KL(before || after), not the reverse
    reverse = (q * (q.log() - p.log())).sum(-1)
    assert kl != pytest.approx(((reverse[0, 0] + reverse[0, 1] + reverse[1, 0]) / 3).item(), rel=1e-3)


def test_kl_ignores_masked_positions():
    torch.manual_seed(0)
    before = torch.randn(1, 6, 9)
    after = before.clone()
    after[0, 3:] = torch.randn(3, 9) * 10
    mask = torch.tensor([[True, True, True, False, False, False]])
    assert lm.kl_on_positions(before, after, mask).item() == pytest.approx(0, abs=1e-6)
    assert lm.kl_on_positions(before, after, mask.float()).item() == pytest.approx(0, abs=1e-6)
    assert lm.kl_on_positions(before, after, ~mask).item() > 0.1


def test_kl_empty_mask_is_zero():
    before, after = torch.zeros(1, 2, 3), torch.randn(1, 2, 3)
    assert lm.kl_on_positions(before, after, torch.zeros(1, 2)).item() == 0


def test_kl_is_differentiable():
    before = torch.randn(1, 3, 5)
    after = torch.randn(1, 3, 5, requires_grad=True)
    lm.kl_on_positions(before, after, torch.ones(1, 3)).backward()
    assert after.grad is not None and after.grad.abs().sum() > 0


# -- generate ------------------------------------------------------------------------------------------------

def manual_greedy(model, tokenizer, prompt, max_new_tokens):
    seq = ids(tokenizer, prompt)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([seq + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_decoder_only(llama, tokenizer):
    prompts = ["Hello", "The capital of France is "]
    out = lm.generate(llama, tokenizer, prompts, max_new_tokens=5)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(s, str) for s in out)
    assert tokenizer.padding_side == "right"  # restored after left-padding the batch
    assert out == [manual_greedy(llama, tokenizer, p.rstrip(" "), 5) for p in prompts]
    assert out == [lm.generate(llama, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]


def manual_greedy_seq2seq(model, tokenizer, prompt, max_new_tokens):
    new = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            enc, dec = torch.tensor([ids(tokenizer, prompt)]), torch.tensor([new])
            logits = model(input_ids=enc, decoder_input_ids=dec).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_seq2seq(t5, tokenizer):
    prompts = ["Hello", "The capital of France is"]
    out = lm.generate(t5, tokenizer, prompts, max_new_tokens=4)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(s, str) for s in out)
    assert all(len(s) <= 4 for s in out)
    assert tokenizer.padding_side == "right"
    assert out == [manual_greedy_seq2seq(t5, tokenizer, p, 4) for p in prompts]
