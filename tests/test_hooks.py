"""modeledit.hooks.Trace: capture, edit and differentiate module inputs/outputs, then leave no hook behind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, SEQ2SEQ, H, tiny_model
from torch import nn

from modeledit.arch import architecture
from modeledit.hooks import Trace


def inputs_for(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(3, 100, (2, 6), generator=g)}
    if name in SEQ2SEQ:
        batch["decoder_input_ids"] = torch.randint(3, 100, (2, 4), generator=g)
    return batch


def logits_of(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert len(module._forward_hooks) == 0, f"hook left on {name!r}"
        assert len(module._forward_pre_hooks) == 0, f"pre-hook left on {name!r}"


# -- capture ---------------------------------------------------------------------------------------------
def test_llama_capture_matches_manual_computation():
    model = tiny_model("llama")
    batch = inputs_for("llama")
    mlp, down = "model.layers.0.mlp", "model.layers.0.mlp.down_proj"
    names = ["model.embed_tokens", mlp, down, "model.layers.1"]
    with Trace(model, names, capture_input=True) as tr:
        logits = logits_of(model, batch)
    emb = model.model.embed_tokens.weight
    assert torch.equal(tr["model.embed_tokens"].input, batch["input_ids"])
    assert torch.equal(tr["model.embed_tokens"].output, emb[batch["input_ids"]])
    # MLP: down_proj(silu(gate_proj(x)) * up_proj(x)), computed by hand from the captured MLP input
    x = tr[mlp].input
    layer = model.model.layers[0].mlp
    keys = F.silu(x @ layer.gate_proj.weight.T) * (x @ layer.up_proj.weight.T)
    torch.testing.assert_close(tr[down].input, keys)
    torch.testing.assert_close(tr[down].output, keys @ layer.down_proj.weight.T)
    assert torch.equal(tr[mlp].output, tr[down].output)
    # logits = lm_head(norm(residual after the last block))
    last = tr["model.layers.1"].output
    assert last.shape == (2, 6, H)
    torch.testing.assert_close(logits, model.lm_head(model.model.norm(last)))


def test_gpt2_capture_matches_manual_computation():
    model = tiny_model("gpt2")
    batch = inputs_for("gpt2")
    c_fc = "transformer.h.0.mlp.c_fc"
    ln_2 = "transformer.h.0.ln_2"
    with Trace(model, [c_fc, ln_2, "transformer.h.0", "transformer.h.1"], capture_input=True) as tr:
        logits = logits_of(model, batch)
    tm = model.transformer
    positions = torch.arange(6)
    torch.testing.assert_close(tr["transformer.h.0"].input, tm.wte(batch["input_ids"]) + tm.wpe(positions))
    conv = tm.h[0].mlp.c_fc  # Conv1D: y = x @ W + b with W stored (in, out)
    torch.testing.assert_close(tr[c_fc].output, tr[c_fc].input @ conv.weight + conv.bias)
    norm = tm.h[0].ln_2  # the MLP reads ln_2 of the residual stream
    manual_norm = F.layer_norm(tr[ln_2].input, (H,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(tr[c_fc].input, manual_norm)
    torch.testing.assert_close(logits, tm.ln_f(tr["transformer.h.1"].output) @ tm.wte.weight.T)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_capture_mlp_output_linear(name):
    """For every architecture: captured MLP-output input/output satisfy y = x W^T + b."""
    model = tiny_model(name)
    arch = architecture(model)
    kinds = ["encoder", "decoder"] if name in SEQ2SEQ else ["decoder"]
    names = [arch.mlp_out(1, kind) for kind in kinds]
    with Trace(model, names, capture_input=True) as tr:
        logits_of(model, inputs_for(name))
    for module_name in names:
        module = arch.linear(module_name)
        x, y = tr[module_name].input, tr[module_name].output
        assert x is not None and y is not None
        expected = x @ arch.weight_as_out_in(module_name).T
        if module.bias is not None:
            expected = expected + module.bias
        torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_capture_residual_is_a_tensor(name):
    """Blocks returning tuples (GPT-Neo, T5) are captured as their first element: the hidden states."""
    model = tiny_model(name)
    arch = architecture(model)
    names = [b.name for b in arch.blocks]
    with Trace(model, names, capture_input=True) as tr:
        logits_of(model, inputs_for(name))
    for module_name in names:
        assert isinstance(tr[module_name].output, torch.Tensor)
        assert isinstance(tr[module_name].input, torch.Tensor)
        assert tr[module_name].output.shape[-1] == H
        assert tr[module_name].output.shape == tr[module_name].input.shape


def test_capture_flags():
    model = tiny_model("llama")
    name = "model.layers.0.mlp.up_proj"
    with Trace(model, [name]) as tr:  # defaults: output only
        logits_of(model, inputs_for("llama"))
    assert tr[name].input is None and tr[name].output is not None
    with Trace(model, [name], capture_input=True, capture_output=False) as tr:
        logits_of(model, inputs_for("llama"))
    assert tr[name].input is not None and tr[name].output is None


def test_detach():
    model = tiny_model("llama")
    name = "model.layers.0.mlp.up_proj"
    batch = inputs_for("llama")
    with Trace(model, [name], capture_input=True) as tr:
        model(**batch)
    assert tr[name].output.requires_grad and tr[name].output.grad_fn is not None
    with Trace(model, [name], capture_input=True, detach=True) as tr_detached:
        model(**batch)
    assert not tr_detached[name].output.requires_grad
    assert torch.equal(tr_detached[name].output, tr[name].output.detach())
    assert torch.equal(tr_detached[name].input, tr[name].input.detach())


# -- edit_output -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_edit_output_identity_changes_nothing(name):
    model = tiny_model(name)
    arch = architecture(model)
    batch = inputs_for(name)
    base = logits_of(model, batch)
    seen = []

    def same(module_name, output):
        seen.append(module_name)
        return output

    names = [b.name for b in arch.blocks] + [arch.mlp_out(0, b.stack) for b in arch.blocks if b.index == 0]
    with Trace(model, names, edit_output=same):
        logits = logits_of(model, batch)
    assert torch.equal(logits, base)
    assert sorted(seen) == sorted(names)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_edit_output_changes_logits(name):
    model = tiny_model(name)
    arch = architecture(model)
    batch = inputs_for(name)
    base = logits_of(model, batch)
    kinds = ["encoder", "decoder"] if name in SEQ2SEQ else ["decoder"]
    for kind in kinds:
        for target in (arch.residual(0, kind), arch.mlp_out(0, kind)):

            def shift(_name, output):  # random, not constant: LayerNorm would cancel a constant shift
                return output + torch.randn(output.shape, generator=torch.Generator().manual_seed(3))

            with Trace(model, [target], edit_output=shift) as tr:
                logits = logits_of(model, batch)
            assert logits.shape == base.shape
            assert not torch.allclose(logits, base, atol=1e-4), f"editing {target} did not change the logits"
            assert logits_of(model, batch).equal(base)  # no lasting effect after the with-block
            assert tr[target].output is not None


def test_edit_output_replaces_residual_exactly():
    """Replacing the last block's output with z gives logits lm_head(norm(z)), and the capture shows z."""
    model = tiny_model("llama")
    batch = inputs_for("llama")
    torch.manual_seed(5)
    z = torch.randn(2, 6, H)
    received = {}

    def replace(module_name, output):
        received[module_name] = output.detach().clone()
        return z

    with Trace(model, ["model.layers.1"], edit_output=replace) as tr:
        logits = logits_of(model, batch)
    torch.testing.assert_close(logits, model.lm_head(model.model.norm(z)))
    assert torch.equal(tr["model.layers.1"].output, z)
    # the edit function received the original output
    with Trace(model, ["model.layers.1"]) as plain:
        logits_of(model, batch)
    assert torch.equal(received["model.layers.1"], plain["model.layers.1"].output)


def test_edit_output_of_tuple_returning_block_keeps_the_rest():
    model = tiny_model("t5")
    batch = inputs_for("t5")
    base = logits_of(model, batch)
    target = "decoder.block.1"
    outputs = []
    handle = model.get_submodule(target).register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        with Trace(model, [target], edit_output=lambda n, y: y * 2):
            logits = logits_of(model, batch)
    finally:
        handle.remove()
    assert not torch.allclose(logits, base)
    # the hook registered before Trace's saw the original tuple; its length is kept by the edit
    assert isinstance(outputs[0], tuple) and len(outputs[0]) >= 2


# -- gradients -------------------------------------------------------------------------------------------
def test_retain_grad_matches_hand_derivation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(7, 4)
    with Trace(net, ["0"], retain_grad=True) as tr:
        out = net(x)
    loss = (out**2).sum()
    loss.backward()
    h = x @ net[0].weight.T + net[0].bias
    expected = ((2 * out.detach()) @ net[2].weight.detach()) * (1 - torch.tanh(h.detach()) ** 2)
    assert tr["0"].output_grad is not None
    torch.testing.assert_close(tr["0"].output_grad, expected)
    # and autograd on an independent recomputation agrees
    h2 = (x @ net[0].weight.T + net[0].bias).detach().requires_grad_()
    (grad,) = torch.autograd.grad((net[2](torch.tanh(h2)) ** 2).sum(), h2)
    torch.testing.assert_close(tr["0"].output_grad, grad)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_retain_grad_on_tiny_model_matches_autograd(name):
    model = tiny_model(name)
    arch = architecture(model)
    batch = inputs_for(name)
    target = arch.mlp_out(0)
    labels = torch.randint(3, 100, batch["input_ids"].shape, generator=torch.Generator().manual_seed(9))

    def loss_of(logits):
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    with Trace(model, [target], retain_grad=True) as tr:
        loss = loss_of(model(**batch).logits)
    loss.backward()
    got = tr[target].output_grad
    assert got is not None and got.shape == tr[target].output.shape
    assert got.abs().sum() > 0

    # reference: d loss / d (output + eps) at eps = 0, through an independent forward
    model.zero_grad()
    eps = torch.zeros_like(got, requires_grad=True)
    with Trace(model, [target], edit_output=lambda n, y: y + eps):
        loss2 = loss_of(model(**batch).logits)
    (expected,) = torch.autograd.grad(loss2, eps)
    torch.testing.assert_close(loss2.detach(), loss.detach())
    torch.testing.assert_close(got, expected)


def test_no_output_grad_without_retain_grad_or_under_no_grad():
    model = tiny_model("llama")
    batch = inputs_for("llama")
    target = "model.layers.0.mlp.down_proj"
    with Trace(model, [target]) as tr:
        model(**batch).logits.sum().backward()
    assert tr[target].output_grad is None
    with Trace(model, [target], retain_grad=True) as tr:
        logits_of(model, batch)  # no_grad: nothing to differentiate, and no error
    assert tr[target].output_grad is None
    assert tr[target].output is not None


# -- hook removal ----------------------------------------------------------------------------------------
def test_hooks_removed_after_with_block():
    model = tiny_model("llama")
    arch = architecture(model)
    names = [b.name for b in arch.blocks] + arch.last_mlp_linears(2)
    batch = inputs_for("llama")
    with Trace(model, names, capture_input=True, retain_grad=True, edit_output=lambda n, y: y) as tr:
        for name in names:
            assert len(model.get_submodule(name)._forward_hooks) == 1
        logits_of(model, batch)
    assert_no_hooks(model)
    first = tr[names[0]].output
    logits_of(model, inputs_for("llama", seed=1))  # a later forward no longer updates the trace
    assert tr[names[0]].output is first


def test_hooks_removed_when_the_body_raises():
    model = tiny_model("gpt2")
    with pytest.raises(RuntimeError, match="boom"):
        with Trace(model, ["transformer.h.0", "transformer.h.1.mlp.c_proj"]):
            raise RuntimeError("boom")
    assert_no_hooks(model)


def test_unknown_name_leaves_no_hooks():
    model = tiny_model("llama")
    with pytest.raises(AttributeError):
        with Trace(model, ["model.layers.0", "model.layers.0.nonexistent"]):
            pass
    assert_no_hooks(model)


def test_nested_traces():
    model = tiny_model("llama")
    name = "model.layers.0"
    batch = inputs_for("llama")
    with Trace(model, [name]) as outer:
        with Trace(model, [name], edit_output=lambda n, y: y * 0) as inner:
            logits_of(model, batch)
        assert len(model.get_submodule(name)._forward_hooks) == 1
    assert_no_hooks(model)
    assert torch.count_nonzero(outer[name].output) > 0  # registered first: saw the unedited output
    assert torch.count_nonzero(inner[name].output) == 0
