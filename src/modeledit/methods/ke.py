"""KE: KnowledgeEditor (De Cao et al., "Editing Factual Knowledge in Language Models", EMNLP 2021).

A hypernetwork conditioned on the edit turns the edit's gradient into the update of each edited matrix W
(out, in). The condition is the text ``"<prediction> >> <target_new> || <prompt>"`` (prediction: the
record's ``target_true``, a stand-in for the model's current answer that saves a generation; without one,
the model's greedy continuation), embedded with the model's own (frozen) input embeddings and read by a
small bidirectional LSTM into a vector c. Per edited matrix j, a linear head of c gives

    m_out (out), m_in (in)      a gated rank-1 mask   M = sigmoid(m_out) sigmoid(m_in)^T   (in [0, 1])
    o_out (out), o_in (in)      a rank-1 offset       O = o_out o_in^T
    eta                         a gate                sigma(eta)
    delta W_j = -lr_j * sigma(eta) * (M * grad_W L + O)                         lr_j learned per matrix

M * grad (elementwise) with grad = sum_t delta_t u_t^T is sum_t (s(m_out) * delta_t)(s(m_in) * u_t)^T, s the
sigmoid: the patch stays low-rank (tokens + 1 columns); the mask and offset are factored, so each head has
2 (out + in) + 1 outputs instead of out x in. At init the offset is 0 (zero o_out head), the mask 1/4.

Training (``modeledit train ke``) solves the constrained problem of the paper,
    min  NLL(target_new | edit prompts, paraphrases; W + delta W)   s.t.   C = KL(p_W || p_{W+dW}) <= margin
through its Lagrangian L = NLL + lambda (C - margin): the hypernetwork descends on L (the shared trainer's
Adam), and lambda >= 0 ascends on it, lambda <- max(0, lambda + lr_lambda (C - margin)) once per training
batch. The validation loss (which picks the best checkpoint) uses a fixed weight instead of the moving lambda:
NLL + val_kl_weight * max(C - margin, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..arch import architecture, linear_shape
from ..editor import Editor, register
from ..hooks import Trace
from ..lm import aligned_logits, generate, row_nll
from ..patch import Delta, linear_delta
from ..requests import EditRequest
from ..training.checkpoint import editor_meta, read_editor_files, with_saved_hparams, write_editor_files
from ..training.data import MetaBatch

CONFIG_FILE, WEIGHTS_FILE = "ke.json", "ke.safetensors"
FORMAT_VERSION = 1


class KEError(ValueError):
    """No trained KnowledgeEditor fits this model; the message says how to get one."""


@dataclass
class KEConfig:
    """KE: an LSTM over "prediction >> target || prompt" masks and offsets each matrix's gradient."""

    editor_path: str | None = None  # folder with ke.json + ke.safetensors
    modules: list[str] | None = None  # edited linear layers; None: MLP matrices of the last num_blocks
    num_blocks: int = 3
    hidden: int = 128  # LSTM hidden size per direction (the condition vector has 2 x hidden)
    lr_init: float = 5e-2  # initial step size lr_j per matrix (x mask 1/4 x gate 1/2 at init)
    margin: float = 1e-3  # the KL constraint's bound
    lambda_init: float = 1.0  # initial Lagrange multiplier
    lr_lambda: float = 1e-2  # gradient-ascent step of the Lagrange multiplier (per training batch)
    val_kl_weight: float = 1.0  # fixed weight of the constraint violation in the validation loss
    lr: float = 1e-4  # Adam learning rate of the hypernetwork (training)
    max_condition_tokens: int = 64
    seed: int = 0


def row_factors(
    model: nn.Module, batch: dict, modules: list[str], n_rows: int
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per row i < n_rows: {module: (u, delta)}, the token factors of the gradient of row i's mean NLL
    (sum_t delta_t u_t^T = d NLL_i / dW in (out, in)); padding dropped, detached."""
    params = dict(model.named_parameters())
    leaves = {f"{m}.weight": params[f"{m}.weight"].detach().requires_grad_(True) for m in modules}
    with torch.enable_grad(), Trace(model, modules, capture_input=True) as tr:
        logits, labels = aligned_logits(model, batch, params=leaves)
        loss = row_nll(logits[:n_rows], labels[:n_rows]).sum()
        grads = torch.autograd.grad(loss, [tr[m].output for m in modules])
    out: list[dict] = [{} for _ in range(n_rows)]
    for m, g in zip(modules, grads, strict=True):
        u_all, d_all = tr[m].input.detach(), g.detach()
        for i in range(n_rows):
            u, d = u_all[i], d_all[i]
            keep = (u != 0).any(-1) & (d != 0).any(-1)
            out[i][m] = (u[keep].float(), d[keep].float())
    return out


class KENetwork(nn.Module):
    """Condition encoder (projection + bidirectional LSTM, mean-pooled) and one head per edited matrix."""

    def __init__(self, shapes: dict[str, tuple[int, int]], embed_dim: int, hidden: int, lr_init: float):
        super().__init__()
        self.shapes = dict(shapes)  # module name -> (out, in)
        self.proj = nn.Linear(embed_dim, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.heads = nn.ModuleList([nn.Linear(2 * hidden, 2 * (o + i) + 1) for o, i in self.shapes.values()])
        with torch.no_grad():
            for head, (o, i) in zip(self.heads, self.shapes.values(), strict=True):
                nn.init.normal_(head.weight, std=0.01)
                head.bias.zero_()
                head.weight[o + i : 2 * o + i].zero_()  # o_out = 0: no offset at init
        self.log_lr = nn.Parameter(torch.full((len(self.shapes),), math.log(lr_init)))
        self.register_buffer("lam", torch.zeros((), dtype=torch.float64))

    def encode(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(k, T, E) embeddings with a (k, T) mask -> (k, 2 hidden) condition vectors."""
        lengths = mask.sum(-1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            torch.tanh(self.proj(embeddings)), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=mask.shape[1])
        return (out * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(-1).to(out)

    def head_outputs(self, cond: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """{module: {m_out, m_in, o_out, o_in (k, dim), eta (k,)}} for k condition vectors."""
        out = {}
        for head, (name, (o, i)) in zip(self.heads, self.shapes.items(), strict=True):
            h = head(cond)
            out[name] = {
                "m_out": h[:, :o],
                "m_in": h[:, o : o + i],
                "o_out": h[:, o + i : 2 * o + i],
                "o_in": h[:, 2 * o + i : 2 * (o + i)],
                "eta": h[:, -1],
            }
        return out

    def forward(
        self, cond: torch.Tensor, factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (left (out, r), right (r, in))}: delta W = left @ right, summed over the k edits."""
        heads = self.head_outputs(cond)
        lrs = self.log_lr.exp()
        updates = {}
        for j, name in enumerate(self.shapes):
            h, lefts, rights = heads[name], [], []
            for i, f in enumerate(factors):
                u, delta = f[name]
                scale = -lrs[j] * torch.sigmoid(h["eta"][i])
                lefts += [
                    scale * torch.sigmoid(h["m_out"][i]).unsqueeze(-1) * delta.T,
                    scale * h["o_out"][i, :, None],
                ]
                rights += [u * torch.sigmoid(h["m_in"][i]), h["o_in"][i][None]]
            updates[name] = (torch.cat(lefts, 1), torch.cat(rights, 0))
        return updates


@register
class KE(Editor):
    name = "ke"
    Config = KEConfig

    def __init__(self, model: nn.Module, tokenizer, config: KEConfig, network: KENetwork | None = None):
        super().__init__(model, tokenizer, config)
        self.network = network
        if network is None:
            self.load(self._editor_dir())
        self.network.eval()

    @classmethod
    def for_training(cls, model: nn.Module, tokenizer, config: KEConfig) -> KE:
        arch = architecture(model)
        modules = list(config.modules) if config.modules else arch.last_mlp_linears(config.num_blocks)
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            network = KENetwork(
                {m: linear_shape(arch.linear(m)) for m in modules},
                arch.embeddings().weight.shape[1],
                config.hidden,
                config.lr_init,
            )
        network.lam.fill_(config.lambda_init)
        return cls(model, tokenizer, config, network)

    # -- the condition --------------------------------------------------------------------------------
    def condition_texts(self, requests: list[EditRequest]) -> list[str]:
        texts = []
        for r in requests:
            prediction = r.target_true
            if not prediction:
                prediction = generate(self.model, self.tokenizer, [r.text], max_new_tokens=4)[0].strip()
            texts.append(f"{prediction} >> {r.target_new} || {r.text}")
        return texts

    def condition(self, requests: list[EditRequest]) -> torch.Tensor:
        """(k, 2 hidden): the LSTM's reading of the edits, over the model's own frozen input embeddings."""
        rows = [
            self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.config.max_condition_tokens]
            or [0]
            for t in self.condition_texts(requests)
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            emb = self.arch.embeddings()(ids.to(device)).float()
        return self.network.encode(emb, mask.to(device))

    def updates(
        self, requests: list[EditRequest], batch: dict
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        factors = row_factors(self.model, batch, list(self.network.shapes), len(requests))
        return self.network(self.condition(requests), factors)

    # -- editing ----------------------------------------------------------------------------------------
    def compute_deltas(self, requests: list[EditRequest]) -> dict[str, Delta]:
        from ..lm import target_batch

        batch = target_batch(
            self.tokenizer, [r.text for r in requests], [r.target_new for r in requests], self.arch.is_seq2seq
        )
        with torch.no_grad():
            cond = self.condition(requests)
        factors = row_factors(self.model, batch, list(self.network.shapes), len(requests))
        with torch.no_grad():
            updates = self.network(cond, factors)
        return dict(linear_delta(self.model, m, left, right) for m, (left, right) in updates.items())

    # -- training (the trainer's learned-editor interface) ---------------------------------------------
    def train(self, mode: bool = True) -> KE:
        self.network.train(mode)
        return self

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.network.parameters()), "lr": self.config.lr}]

    def update_lambda(self, constraint: float) -> None:
        """Gradient ascent on the Lagrangian: d L / d lambda = C - margin; lambda stays >= 0."""
        self.network.lam.copy_((self.network.lam + self.config.lr_lambda * constraint).clamp(min=0))

    def training_loss(self, batch: MetaBatch) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        stats: dict[str, float] = {}
        with torch.set_grad_enabled(self.network.training):
            params = dict(self.model.named_parameters())
            edited = {}
            for m, (left, right) in self.updates(batch.requests, batch.edit).items():
                name, delta = linear_delta(self.model, m, left, right)
                edited[name] = params[name] + delta.dense()
            logits, labels = aligned_logits(self.model, batch.gen, params=edited)
            nll = row_nll(logits, labels)
            edit_loss = nll[: batch.n_new].mean()
            stats["edit_nll"] = edit_loss.item()
            kl = edit_loss.new_zeros(())
            if batch.loc is not None:
                with torch.no_grad():
                    before = aligned_logits(self.model, batch.loc)
                after = aligned_logits(self.model, batch.loc, params=edited)
                kl = self.task.locality_penalty(before, after, batch, stats, "kl")
            constraint = kl - c.margin
            lam = float(self.network.lam)
            if self.network.training:
                loss = edit_loss + lam * constraint
                self.update_lambda(constraint.item())
            else:
                loss = edit_loss + c.val_kl_weight * constraint.clamp(min=0)
        self.task.success_stats(None, nll.detach(), batch, stats)
        stats["lambda"] = lam
        stats["alpha"] = self.network.log_lr.exp().mean().item()
        return loss, stats

    # -- files ------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = editor_meta(self, FORMAT_VERSION, self.network.shapes, embed_dim=self.network.proj.in_features)
        tensors = {k: v.detach().contiguous() for k, v in self.network.state_dict().items()}
        return write_editor_files(directory, "ke", meta, tensors)

    def load(self, directory: str | Path) -> None:
        meta, tensors = read_editor_files(directory, "ke", self.model, "KnowledgeEditor", KEError)
        self.config = with_saved_hparams(self.config, meta)
        if self.network is None:
            shapes = {m: tuple(s) for m, s in meta["shapes"].items()}
            self.network = KENetwork(shapes, meta["embed_dim"], self.config.hidden, self.config.lr_init)
        self.network.load_state_dict(tensors)

    def _editor_dir(self) -> Path:
        if self.config.editor_path:
            return Path(self.config.editor_path)
        raise KEError(
            "ke needs a trained KnowledgeEditor: `modeledit train ke --data TRAIN.json --out DIR`, then "
            "--set editor_path=DIR"
        )
