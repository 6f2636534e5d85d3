"""ENN: Editable Neural Networks (Sinitsin et al., "Editable Neural Networks", ICLR 2020): editable training.

Unlike MEND or KE, ENN trains nothing beside the model: it meta-trains the model's *own* parameters theta
(here only the edited matrices, the MLPs of the last ``num_blocks`` blocks, to stay CPU-sized) so that one
plain gradient step edits well. Per training batch (MAML-style, second order through one inner step):

    theta' = theta - lr_j * dL_edit(theta)/d theta_j         inner SGD step; lr_j learned per edited matrix
    loss   = c_edit * NLL(target_new | edit prompts, paraphrases; theta')
           + c_loc  * KL(p_theta || p_theta')                  the edit keeps unrelated outputs of the base
           + c_base * KL(p_original || p_theta)                the base stays close to the original model

The inner gradient is taken with ``create_graph=True``, so the outer loss reaches theta both directly and
through the inner step (Hessian-vector products).

**ENN changes theta.** Training therefore produces a *new base model*, written to ``OUT/model`` (a normal
model directory with its own fingerprint, recorded in ``OUT/enn.json``), and edits are patches against that
new base: ``modeledit eval --model OUT/model --method enn --set editor_path=OUT``. An ENN editor refuses the
original model. ``OUT/enn.json`` also records the drawdown the meta-training costs: the perplexity of
unrelated text under the ENN base versus the original model.

An edit is one gradient step on the edited matrices with the learned step sizes: for each matrix
delta W = -lr_j * sum_t delta_t u_t^T (the exact gradient as its token factors), a low-rank patch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..editor import Editor, default_modules, register
from ..lm import text_perplexity
from ..locality import default_locality_texts
from ..models import fingerprint
from ..patch import Delta, linear_delta
from ..tasks import resolve_task
from .mend import gradient_factors

CONFIG_FILE, WEIGHTS_FILE, MODEL_DIR = "enn.json", "enn.safetensors", "model"
FORMAT_VERSION = 1


class ENNError(ValueError):
    """No usable ENN editor for this model; the message says what to do."""


@dataclass
class ENNConfig:
    """ENN: meta-trains the edited matrices of the model itself; edits are one learned-rate gradient step."""

    editor_path: str | None = None  # folder of `modeledit train enn` (enn.json, enn.safetensors, model/)
    modules: list[str] | None = None  # edited linear layers; None: MLP matrices of the last num_blocks
    num_blocks: int = 3
    edit_lr_init: float = 1e-2  # initial inner step size per matrix (a raw step of 1e-2 moves SmolLM2)
    c_edit: float = 1.0  # weight of the post-edit NLL of target_new
    c_loc: float = 1.0  # weight of KL(p_theta || p_theta') on locality rows (the edit's locality)
    c_base: float = 1.0  # weight of KL(p_original || p_theta) on locality rows (the base's drawdown)
    lr: float = 3e-5  # Adam learning rate of the base weights theta (training)
    lr_edit_lr: float = 1e-2  # Adam learning rate of the log step sizes (training)
    drawdown_data: str | None = None  # SQuAD-style JSON: its last 10% of sentences measure the drawdown
    drawdown_texts: int = 100  # at most this many sentences for the drawdown perplexity
    save_model: bool = True  # write the meta-trained base model to OUT/model at the end of training


# -- helpers ---------------------------------------------------------------------------------------


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new.detach() - old.detach()).norm() / old.detach().norm())


def drawdown_texts(config) -> tuple[list[str], str]:
    """Unrelated texts for the drawdown perplexity and where they come from."""
    if config.drawdown_data:
        from ..training.data import wiki_sentences

        sentences = wiki_sentences(config.drawdown_data)
        held_out = sentences[-max(len(sentences) // 10, 1) :]  # the CLI's validation split of --wiki
        return held_out[: config.drawdown_texts], f"{config.drawdown_data} (last 10% of sentences)"
    return default_locality_texts()[: config.drawdown_texts], "built-in locality texts"


# -- the editor ------------------------------------------------------------------------------------------


@register
class ENN(Editor):
    name = "enn"
    Config = ENNConfig
    any_model = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        config: ENNConfig,
        theta: dict[str, nn.Parameter] | None = None,
        modules: list[str] | None = None,
        task=None,
    ):
        super().__init__(model, tokenizer, config, task)
        self.training = False
        self.theta = theta  # name -> meta-trained weight (training only; the model itself is never changed)
        if theta is None:
            self._load_for_editing()
        else:
            self.modules = list(modules)
            self.log_lr = nn.Parameter(torch.full((len(self.modules),), math.log(config.edit_lr_init)))

    @classmethod
    def for_training(cls, model: nn.Module, tokenizer, config: ENNConfig, task=None) -> ENN:
        """An ENN whose theta starts as a copy of the model's edited weights (the model is left as it is)."""
        task = resolve_task(task, model, tokenizer)
        modules = list(config.modules) if config.modules else default_modules(model, task, config.num_blocks)
        params = dict(model.named_parameters())
        theta = {f"{m}.weight": nn.Parameter(params[f"{m}.weight"].detach().clone()) for m in modules}
        return cls(model, tokenizer, config, theta=theta, modules=modules, task=task)

    def edit_lrs(self) -> torch.Tensor:
        return self.log_lr.detach().exp()

    # -- editing ----------------------------------------------------------------------------------------
    def compute_deltas(self, requests: list) -> dict[str, Delta]:
        if self.theta is not None:
            raise ENNError(
                "this ENN editor is being trained: its theta is not the model's weights yet; edit with the "
                "saved base model (OUT/model) and editor_path=OUT"
            )
        factors = gradient_factors(self.model, self.task, requests, self.modules)
        lrs = self.edit_lrs()
        return dict(
            linear_delta(self.model, m, -lrs[j] * factors[m][1].T, factors[m][0])
            for j, m in enumerate(self.modules)
        )

    # -- training (the trainer's learned-editor interface) ---------------------------------------------
    def train(self, mode: bool = True) -> ENN:
        self.training = mode
        return self

    def param_groups(self) -> list[dict]:
        return [
            {"params": list(self.theta.values()), "lr": self.config.lr},
            {"params": [self.log_lr], "lr": self.config.lr_edit_lr},
        ]

    def inner_step(self, batch, create_graph: bool) -> dict[str, torch.Tensor]:
        """theta' = theta - lr_j * grad of the summed per-edit loss of the edit rows (one SGD step)."""
        names = list(self.theta)
        # Second order: the inner gradient is differentiated again, which CPU flash attention's backward
        # does not support; the math backend is made of differentiable operations.
        backends = [SDPBackend.MATH] if create_graph else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
        with torch.enable_grad(), sdpa_kernel(backends):
            inner = self.task.loss(self.task.outputs(self.model, batch.edit, self.theta), batch.edit).sum()
            grads = torch.autograd.grad(inner, [self.theta[n] for n in names], create_graph=create_graph)
        lrs = self.log_lr.exp()
        return {n: self.theta[n] - lrs[j] * g for j, (n, g) in enumerate(zip(names, grads, strict=True))}

    def training_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """A MetaBatch (language models) or a TensorMetaBatch (any model, with a Task)."""
        c, task = self.config, self.task
        stats: dict[str, float] = {}
        with torch.set_grad_enabled(self.training):
            edited = self.inner_step(batch, create_graph=self.training)
            gen_out = task.outputs(self.model, batch.gen, edited)
            gen_loss = task.loss(gen_out, batch.gen)
            edit_loss = gen_loss[: batch.n_new].mean()
            loss = c.c_edit * edit_loss
            stats["edit_nll"] = edit_loss.item()
            if batch.loc is not None:
                with torch.no_grad():
                    original = task.outputs(self.model, batch.loc)
                base = task.outputs(self.model, batch.loc, self.theta)
                after = task.outputs(self.model, batch.loc, edited)
                kl = task.locality_penalty(base, after, batch, stats, "kl")
                kl_base = task.locality_penalty(original, base, batch, {}, "kl_base")
                stats["kl_base"] = kl_base.item()
                loss = loss + c.c_loc * kl + c.c_base * kl_base
        task.success_stats(gen_out, gen_loss.detach(), batch, stats)
        stats["alpha"] = self.log_lr.exp().mean().item()  # the mean edit step size (plotted as "alpha")
        return loss, stats

    # -- files ------------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        hparams = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "editor_path"}
        return {
            "method": self.name,
            "format_version": FORMAT_VERSION,
            "original_fingerprint": fingerprint(self.model),
            "model": getattr(self.model, "name_or_path", None),
            "modules": self.modules,
            "hparams": hparams,
        }

    def save(self, directory: str | Path) -> Path:
        """enn.safetensors: the meta-trained edited weights (theta/<param>) and the log step sizes."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"theta/{n}": p.detach().contiguous() for n, p in self.theta.items()}
        tensors["log_lr"] = self.log_lr.detach().clone()
        meta = self._meta()
        tmp = directory / (WEIGHTS_FILE + ".partial")
        save_file(tensors, str(tmp), metadata={"modeledit": json.dumps(meta)})
        tmp.replace(directory / WEIGHTS_FILE)
        old = directory / CONFIG_FILE
        if old.exists():  # keep what finish_training recorded (base fingerprint, drawdown)
            meta = json.loads(old.read_text()) | meta
        old.write_text(json.dumps(meta, indent=1))
        return directory

    def load(self, directory: str | Path) -> None:
        """Copy a saved theta and step sizes into this (training) editor."""
        tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
        with torch.no_grad():
            for n, p in self.theta.items():
                p.copy_(tensors[f"theta/{n}"])
            self.log_lr.copy_(tensors["log_lr"])

    def base_model(self) -> nn.Module:
        """A copy of the model with theta in place of the edited weights: the new base ENN edits."""
        new = copy.deepcopy(self.model)
        for key in ("_modeledit_fingerprint", "_modeledit_arch", "_modeledit_patches"):
            new.__dict__.pop(key, None)
        params = dict(new.named_parameters())
        with torch.no_grad():
            for n, p in self.theta.items():
                params[n].copy_(p)
        return new

    def finish_training(self, directory: str | Path) -> dict:
        """After training (best theta loaded): write the new base model to OUT/model, record its fingerprint
        and the drawdown it costs (unrelated-text perplexity, ENN base vs original) in enn.json. Models other
        than language models: only the fingerprint of ``base_model()``, which the caller keeps or saves."""
        from ..models import load_model

        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            self.save(directory)
        if not self.task.is_language_model:
            # Any other model: the caller keeps the base (``editor.base_model()``); record its fingerprint.
            info = {
                "edit_lrs": self.log_lr.detach().exp().tolist(),
                "base_fingerprint": fingerprint(self.base_model()),
            }
            meta = json.loads((directory / CONFIG_FILE).read_text()) | info
            (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
            return info
        texts, source = drawdown_texts(self.config)
        ppl_original = text_perplexity(self.model, self.tokenizer, texts)
        ppl_base = text_perplexity(self.model, self.tokenizer, texts, params=self.theta)
        info = {
            "drawdown": {
                "texts": source,
                "n_texts": len(texts),
                "ppl_original": ppl_original,
                "ppl_enn_base": ppl_base,
                "drawdown_ppl": ppl_base / ppl_original - 1,
            },
            "edit_lrs": self.log_lr.detach().exp().tolist(),
            "theta_change_rel": {
                n: _relative_change(p, self.model.get_parameter(n)) for n, p in self.theta.items()
            },
        }
        if self.config.save_model:
            model_dir = directory / MODEL_DIR
            base = self.base_model()
            base.save_pretrained(model_dir)
            self.tokenizer.save_pretrained(model_dir)
            del base
            reloaded, _ = load_model(str(model_dir))  # the fingerprint as `--model OUT/model` will see it
            info |= {"base_dir": MODEL_DIR, "base_fingerprint": fingerprint(reloaded)}
        meta = json.loads((directory / CONFIG_FILE).read_text()) | info
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        return info

    def _editor_dir(self) -> Path:
        if self.config.editor_path:
            return Path(self.config.editor_path)
        here = Path(str(getattr(self.model, "name_or_path", "") or ""))
        if here.name == MODEL_DIR and (here.parent / CONFIG_FILE).exists():  # --model OUT/model
            return here.parent
        raise ENNError(
            "enn needs a trained ENN: `modeledit train enn --data TRAIN.json --out DIR`, then "
            "--model DIR/model --set editor_path=DIR"
        )

    def _load_for_editing(self) -> None:
        directory = self._editor_dir()
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise ENNError(f"{directory} holds no ENN editor ({CONFIG_FILE} + {WEIGHTS_FILE})")
        meta = json.loads((directory / CONFIG_FILE).read_text())
        fp = fingerprint(self.model)
        if "base_fingerprint" not in meta:
            raise ENNError(f"{directory} holds no finished ENN training (no base model recorded)")
        if fp != meta["base_fingerprint"]:
            hint = (
                "ENN changed the model's weights during training: its edits apply to the ENN base model "
                if fp == meta.get("original_fingerprint")
                else "this model is not the ENN base model "
            )
            where = directory / meta.get("base_dir", MODEL_DIR)
            raise ENNError(
                hint
                + f"saved in {where} (fingerprint {meta['base_fingerprint']}); load it with --model {where}"
            )
        known = {f.name for f in dataclasses.fields(ENNConfig)} - {"editor_path"}
        self.config = dataclasses.replace(
            self.config, **{k: v for k, v in meta["hparams"].items() if k in known}
        )
        self.modules = list(meta["modules"])
        tensors = load_file(str(directory / WEIGHTS_FILE))
        self.log_lr = nn.Parameter(tensors["log_lr"].float(), requires_grad=False)
        self.base_info = {k: meta.get(k) for k in ("drawdown", "original_fingerprint", "base_fingerprint")}
