"""Architecture discovery (modeledit.arch) on tiny random models of every supported architecture."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf
from conftest import ARCHITECTURES, FF, SEQ2SEQ, H, tiny_configs, tiny_model
from torch import nn

from modeledit.arch import (
    Architecture,
    ArchitectureError,
    architecture,
    is_linear,
    is_transposed,
    linear_shape,
)

# name -> {stack kind: (block-stack prefix, MLP input module names, MLP output module name)}
EXPECTED: dict[str, dict[str, tuple[str, tuple[str, ...], str]]] = {
    "gpt2": {"decoder": ("transformer.h", ("mlp.c_fc",), "mlp.c_proj")},
    "gptj": {"decoder": ("transformer.h", ("mlp.fc_in",), "mlp.fc_out")},
    "gpt_neo": {"decoder": ("transformer.h", ("mlp.c_fc",), "mlp.c_proj")},
    "gpt_neox": {"decoder": ("gpt_neox.layers", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h")},
    "opt": {"decoder": ("model.decoder.layers", ("fc1",), "fc2")},
    "llama": {"decoder": ("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")},
    "mistral": {"decoder": ("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")},
    "qwen2": {"decoder": ("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")},
    "gemma": {"decoder": ("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")},
    "phi": {"decoder": ("model.layers", ("mlp.fc1",), "mlp.fc2")},
    "t5": {
        "encoder": ("encoder.block", ("layer.1.DenseReluDense.wi",), "layer.1.DenseReluDense.wo"),
        "decoder": ("decoder.block", ("layer.2.DenseReluDense.wi",), "layer.2.DenseReluDense.wo"),
    },
    "bart": {
        "encoder": ("model.encoder.layers", ("fc1",), "fc2"),
        "decoder": ("model.decoder.layers", ("fc1",), "fc2"),
    },
}

LAYER_KEYS = (
    "n_layer",
    "num_layers",
    "num_hidden_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
)


def test_expected_table_covers_every_architecture():
    assert set(EXPECTED) == set(ARCHITECTURES)


def deep_model(name: str, n_layers: int, seed: int = 0) -> nn.Module:
    """The tiny model of ``name`` with ``n_layers`` blocks per stack instead of 2."""
    config = tiny_configs()[name]
    for key in LAYER_KEYS:
        if key in config.to_dict():
            setattr(config, key, n_layers)
    for key in ("layer_types", "attention_layers"):  # per-layer lists must match the new depth
        if getattr(config, key, None) is not None:
            setattr(config, key, (list(getattr(config, key)) * n_layers)[:n_layers])
    torch.manual_seed(seed)
    cls = tf.AutoModelForSeq2SeqLM if name in SEQ2SEQ else tf.AutoModelForCausalLM
    return cls.from_config(config).float().eval()


@functools.cache
def cached_model(name: str, n_layers: int = 2) -> nn.Module:
    """Shared read-only models (tests that modify a model build their own)."""
    return tiny_model(name) if n_layers == 2 else deep_model(name, n_layers)


def expected_linears(name: str, kind: str, layers) -> list[str]:
    prefix, mlp_in, mlp_out = EXPECTED[name][kind]
    return [f"{prefix}.{i}.{m}" for i in layers for m in (*mlp_in, mlp_out)]


def forward(model: nn.Module, name: str, enc_len: int = 5, dec_len: int = 3):
    torch.manual_seed(123)
    ids = torch.randint(3, 100, (1, enc_len))
    kwargs = {"decoder_input_ids": torch.randint(3, 100, (1, dec_len))} if name in SEQ2SEQ else {}
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# -- block stacks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers", [2, 4])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_block_count_per_stack(name, n_layers):
    arch = Architecture(cached_model(name, n_layers))
    kinds = {b.stack for b in arch.blocks}
    assert kinds == set(EXPECTED[name])
    assert arch.is_seq2seq == (name in SEQ2SEQ)
    assert arch.hidden_size == H
    for kind, (prefix, _, _) in EXPECTED[name].items():
        blocks = arch.stack(kind)
        assert len(blocks) == n_layers
        assert [b.index for b in blocks] == list(range(n_layers))
        assert [b.name for b in blocks] == [f"{prefix}.{i}" for i in range(n_layers)]
        assert all(b.stack == kind for b in blocks)
    assert arch.num_layers == n_layers  # decoder blocks
    assert len(arch.blocks) == n_layers * len(EXPECTED[name])
    if name not in SEQ2SEQ:
        assert arch.stack("encoder") == []


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_mlp_module_names(name):
    model = cached_model(name)
    arch = Architecture(model)
    for kind, (prefix, mlp_in, mlp_out) in EXPECTED[name].items():
        for i in range(2):
            block = arch.block(i, kind)
            assert block.mlp_in == mlp_in
            assert block.mlp_out == mlp_out
            assert arch.mlp_in(i, kind) == [f"{prefix}.{i}.{m}" for m in mlp_in]
            assert arch.mlp_out(i, kind) == f"{prefix}.{i}.{mlp_out}"
            assert arch.mlp_linears(i, kind) == [*arch.mlp_in(i, kind), arch.mlp_out(i, kind)]
            for module_name in arch.mlp_in(i, kind):
                assert linear_shape(arch.linear(module_name)) == (FF, H)
            assert linear_shape(arch.linear(arch.mlp_out(i, kind))) == (H, FF)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_negative_layers_count_from_the_end(name):
    arch = Architecture(cached_model(name, 4))
    for kind in EXPECTED[name]:
        assert arch.block(-1, kind) == arch.block(3, kind)
        assert arch.block(-4, kind) == arch.block(0, kind)
        assert arch.mlp_out(-2, kind) == arch.mlp_out(2, kind)


# -- linear layers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_weight_as_out_in_computes_the_layer(name):
    """y = x @ W.T + b with W = weight_as_out_in, for nn.Linear and GPT-2's Conv1D alike."""
    model = cached_model(name)
    arch = Architecture(model)
    torch.manual_seed(1)
    for kind in EXPECTED[name]:
        for module_name in arch.mlp_linears(1, kind):
            module = arch.linear(module_name)
            assert is_linear(module)
            assert is_transposed(module) == (name == "gpt2")
            w = arch.weight_as_out_in(module_name)
            assert tuple(w.shape) == linear_shape(module)
            assert w.data_ptr() == module.weight.data_ptr()  # a view, not a copy
            x = torch.randn(3, w.shape[1])
            with torch.no_grad():
                expected = x @ w.T + (module.bias if module.bias is not None else 0)
                torch.testing.assert_close(module(x), expected)


def test_gpt2_conv1d_is_stored_transposed():
    model = tiny_model("gpt2")
    arch = architecture(model)
    shapes = {"transformer.h.0.mlp.c_fc": (FF, H), "transformer.h.0.mlp.c_proj": (H, FF)}
    for module_name, (out_f, in_f) in shapes.items():
        module = arch.linear(module_name)
        assert type(module).__name__ == "Conv1D"
        assert tuple(module.weight.shape) == (in_f, out_f)  # storage is (in, out)
        assert linear_shape(module) == (out_f, in_f)
        w = arch.weight_as_out_in(module_name)
        assert tuple(w.shape) == (out_f, in_f)
        with torch.no_grad():
            w[2, 1] = 7.5  # writing through the view lands at the transposed position of the storage
        assert module.weight[1, 2].item() == 7.5


def test_llama_linear_is_not_transposed():
    model = tiny_model("llama")
    arch = architecture(model)
    module = arch.linear("model.layers.0.mlp.up_proj")
    assert isinstance(module, nn.Linear) and not is_transposed(module)
    assert tuple(module.weight.shape) == (FF, H) == linear_shape(module)
    assert arch.weight_as_out_in("model.layers.0.mlp.up_proj") is module.weight


def test_linear_rejects_non_linear_module():
    arch = architecture(cached_model("llama"))
    with pytest.raises(ArchitectureError, match="not a linear layer"):
        arch.linear("model.layers.0.mlp")
    with pytest.raises(ArchitectureError, match="LlamaRMSNorm"):
        arch.weight_as_out_in("model.layers.0.input_layernorm")


def test_is_linear_and_linear_shape_on_plain_modules():
    assert is_linear(nn.Linear(3, 5)) and not is_transposed(nn.Linear(3, 5))
    assert linear_shape(nn.Linear(3, 5)) == (5, 3)
    assert not is_linear(nn.LayerNorm(4)) and not is_linear(nn.Embedding(4, 3))


# -- residual stream -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_residual_output_has_hidden_size(name):
    model = cached_model(name)
    arch = Architecture(model)
    enc_len, dec_len = 5, 3  # different lengths tell the encoder and decoder stacks apart
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for kind in EXPECTED[name]:
        for i in range(2):
            module_name = arch.residual(i, kind)
            assert module_name == arch.block(i, kind).name
            module = model.get_submodule(module_name)

            def hook(_m, _inputs, output, key=module_name):
                seen[key] = output[0] if isinstance(output, tuple) else output

            handles.append(module.register_forward_hook(hook))
    try:
        forward(model, name, enc_len, dec_len)
    finally:
        for h in handles:
            h.remove()
    for kind in EXPECTED[name]:
        length = dec_len if name in SEQ2SEQ and kind == "decoder" else enc_len  # decoder-only: input_ids
        for i in range(2):
            out = seen[arch.residual(i, kind)]
            assert tuple(out.shape) == (1, length, H)


# -- embeddings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_tied_embeddings_follow_config(name):
    model = cached_model(name)
    arch = Architecture(model)
    assert arch.embeddings() is model.get_input_embeddings()
    assert arch.lm_head() is model.get_output_embeddings()
    assert arch.tied_embeddings == bool(model.config.tie_word_embeddings)
    assert arch.tied_embeddings == (arch.lm_head().weight is arch.embeddings().weight)


def test_tied_embeddings_cover_both_cases():
    values = {name: Architecture(cached_model(name)).tied_embeddings for name in ARCHITECTURES}
    assert values["llama"] is True and values["gpt2"] is True
    assert values["mistral"] is False and values["gptj"] is False


def test_untied_llama():
    config = tiny_configs()["llama"]
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    assert Architecture(model).tied_embeddings is False
    tied = tiny_model("llama")
    tied.lm_head.weight = nn.Parameter(tied.lm_head.weight.detach().clone())  # same values, own storage
    assert Architecture(tied).tied_embeddings is False


# -- last_mlp_linears ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers", [2, 4])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_last_mlp_linears(name, n_layers):
    arch = Architecture(cached_model(name, n_layers))
    got = arch.last_mlp_linears(3)
    assert len(got) == len(set(got)), f"duplicates in {got}"
    if name in SEQ2SEQ:  # last 2 encoder blocks, then last 2 decoder blocks
        last2 = range(n_layers - 2, n_layers)
        expected = expected_linears(name, "encoder", last2) + expected_linears(name, "decoder", last2)
    else:
        expected = expected_linears(name, "decoder", range(max(n_layers - 3, 0), n_layers))
    assert got == expected
    assert arch.last_mlp_linears() == got  # 3 is the default


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bart"])
def test_last_mlp_linears_one_block(name):
    arch = Architecture(cached_model(name, 4))
    kinds = ["encoder", "decoder"] if name in SEQ2SEQ else ["decoder"]
    assert arch.last_mlp_linears(1) == [n for kind in kinds for n in expected_linears(name, kind, [3])]


def test_last_mlp_linears_more_blocks_than_the_model_has():
    arch = Architecture(cached_model("gpt_neox", 4))
    assert arch.last_mlp_linears(10) == expected_linears("gpt_neox", "decoder", range(4))


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_out_of_range_layer(name):
    arch = Architecture(cached_model(name))
    for bad in (2, 5, -3):
        with pytest.raises(ArchitectureError, match=rf"layer {bad} out of range: the decoder has 2 blocks"):
            arch.block(bad)
        with pytest.raises(ArchitectureError, match="out of range"):
            arch.mlp_out(bad)
        with pytest.raises(ArchitectureError, match="out of range"):
            arch.mlp_linears(bad)
        with pytest.raises(ArchitectureError, match="out of range"):
            arch.residual(bad)
    if name not in SEQ2SEQ:
        with pytest.raises(ArchitectureError, match="the encoder has 0 blocks"):
            arch.block(0, "encoder")


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)),
        nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]),
        nn.Linear(3, 3),
    ],
)
def test_no_block_stack(module):
    with pytest.raises(ArchitectureError, match="no transformer block stack"):
        Architecture(module)
    with pytest.raises(ArchitectureError, match="no transformer block stack"):
        architecture(module)


class _FakeAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(H, H)


class _SquareBlock(nn.Module):
    """An attention module and only hidden->hidden linears: no recognisable MLP."""

    def __init__(self):
        super().__init__()
        self.attn = _FakeAttention()
        self.proj = nn.Linear(H, H)


class _FakeLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = tf.PretrainedConfig()
        self.embed = nn.Embedding(10, H)
        self.layers = nn.ModuleList([_SquareBlock(), _SquareBlock()])

    def get_input_embeddings(self):
        return self.embed


def test_block_without_mlp_is_refused():
    with pytest.raises(ArchitectureError, match=r"block layers\.0: expected MLP input projection"):
        Architecture(_FakeLM())


def test_stack_without_embeddings_is_refused():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([_SquareBlock()])

    with pytest.raises(ArchitectureError, match="get_input_embeddings"):
        Architecture(Bare())


def test_architecture_is_cached_per_model():
    model = tiny_model("phi")
    assert architecture(model) is architecture(model)
    assert architecture(tiny_model("phi")) is not architecture(model)
