"""The file format of every learned editor: ``<name>.json`` (metadata) + ``<name>.safetensors`` (weights)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models import fingerprint


def editor_meta(editor, format_version: int, shapes: dict[str, tuple[int, int]], **extra) -> dict:
    """The metadata of a learned editor's files: method, model fingerprint, edited shapes, hyperparameters."""
    hparams = {k: v for k, v in dataclasses.asdict(editor.config).items() if k != "editor_path"}
    return {
        "method": editor.name,
        "format_version": format_version,
        "fingerprint": fingerprint(editor.model),
        "model": getattr(editor.model, "name_or_path", None),
        "shapes": {m: list(s) for m, s in shapes.items()},
        **extra,
        "hparams": hparams,
    }


def write_editor_files(
    directory: str | Path, stem: str, meta: dict, tensors: dict[str, torch.Tensor]
) -> Path:
    """Atomically write ``stem.safetensors`` (metadata in its header too) and ``stem.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{stem}.safetensors.partial"
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"modeledit": json.dumps(meta)}
    )
    tmp.replace(directory / f"{stem}.safetensors")
    (directory / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    return directory


def read_editor_files(
    directory: str | Path, stem: str, model: nn.Module, what: str, error: type[Exception]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an editor trained for exactly this model; else ``error``, clearly."""
    directory = Path(directory)
    config, weights = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    if not config.exists() or not weights.exists():
        raise error(f"{directory} holds no {what} ({config.name} + {weights.name})")
    meta = json.loads(config.read_text())
    fp = fingerprint(model)
    if meta["fingerprint"] != fp:
        raise error(
            f"the {what} in {directory} was trained for model {meta.get('model')} ({meta['fingerprint']}), "
            f"not this model ({fp}); train one for it with `modeledit train {meta.get('method', stem)}`"
        )
    return meta, load_file(str(weights))


def with_saved_hparams(config, meta: dict, keep: tuple[str, ...] = ()):
    """The config with the hyperparameters an editor was trained with (all but its path); the fields in
    ``keep`` (edit-time settings) keep the config's own value unless it is None."""
    known = {f.name for f in dataclasses.fields(config)} - {"editor_path"}
    chosen = {k for k in keep if getattr(config, k) is not None}
    saved = {k: v for k, v in meta["hparams"].items() if k in known - chosen}
    return dataclasses.replace(config, **saved)
