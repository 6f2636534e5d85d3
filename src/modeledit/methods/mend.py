"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., "Fast Model Editing at Scale").

For a linear layer W (out, in), the gradient of the edit loss is a sum over tokens of rank-1 terms:
dL/dW = sum_t delta_t u_t^T, with u_t the layer's input and delta_t the gradient w.r.t. its output at token t.
MEND edits with a learned transform of these factors instead of the raw gradient:

    z = [norm(u); norm(delta)]                                  running mean/std, frozen outside training
    h = z + U1 relu(V1 (s1_l * z + o1_l) + b1)                  residual low-rank layers, U = 0 at init
    g = h + U2 relu(V2 (s2_l * h + o2_l) + b2)                  (s, o: scale and shift of edited layer l)
    (u~, delta~) = split(g)
    W~ = W - alpha_l * sum_t delta~_t u~_t^T                    a low-rank patch; alpha_l learned per layer

One network serves every edited matrix of one shape. It is trained (``modeledit train mend``) to minimise
c_edit * NLL(target_new | edit prompt and paraphrase; W~) + c_loc * KL(p_W || p_W~) on neighbourhood answers
and unrelated text, with gradients through W~ into the network and the alphas (u and delta are detached:
first order).

Not in the paper, at edit time only (``protect_neighbours``, see ``stand_ins``): the edit's template filled
with the n subjects nearest to its own (stand-in neighbours) gives keys K, each edited matrix's inputs on
those prompts; the update's input factor R becomes R (I - K^T (K K^T + lam I)^-1 K), so the edited matrix
maps the stand-ins' inputs (nearly) as before. The update stays low-rank; 0 stand-ins is the paper's update.
Also not in the paper (``isolate_batch``): a batch's update is the sum of its edits' parts, and each part also
moves the other edits' tokens; ``isolate_edits`` changes the summed output factor as little as possible so
that this cross-talk goes away (0: the paper's plain sum).

The paper writes each layer as z + relu(s * (U V z + b) + o). With U = 0 (identity at init) that
pre-activation is exactly 0 and ReLU passes no gradient, so nothing could ever train; here the ReLU sits
inside the low-rank product and the per-layer scale and shift act on the layer's input, which keeps the
identity at init and trains.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..arch import linear_shape
from ..editor import Editor, default_modules, register
from ..hooks import Trace
from ..lm import is_seq2seq
from ..models import fingerprint
from ..patch import Delta, linear_delta
from ..stand_ins import SUBJECTS, StandIns, project_away
from ..tasks import Task, resolve_task
from ..training.checkpoint import editor_meta, read_editor_files, with_saved_hparams, write_editor_files

EDITORS_DIR = (
    Path(__file__).resolve().parents[1] / "editors"
)  # editors shipped with the package, one folder per model
CONFIG_FILE, WEIGHTS_FILE = "mend.json", "mend.safetensors"
FORMAT_VERSION = 1
# Config fields used only when editing: a value the user sets (not None) wins over the saved one.
EDIT_TIME_FIELDS = ("alpha_scale", "protect_neighbours", "protect_ridge", "isolate_batch")


class EditorNotTrainedError(ValueError):
    """No trained MEND editor fits this model; the message says how to get one."""


@dataclass
class MENDConfig:
    """MEND: a trained network turns the edit's gradient into a low-rank update (needs a trained editor)."""

    editor_path: str | None = None  # folder with mend.json + mend.safetensors; None: the shipped one
    modules: list[str] | None = None  # edited linear layers; None: MLP matrices of the last num_blocks
    num_blocks: int = 3
    # which edited modules share one editor network: {key: [module, ...]}; None: one network per weight
    # shape (the paper); set by ``combine``, which keeps each combined editor's networks apart
    groups: dict[str, list[str]] | None = None
    rank: int = 64  # rank of the editor network's layers (the paper uses 1920)
    alpha_init: float = 1e-4  # initial per-layer step size alpha_l
    # edit time only: multiplies the learned alpha_l (> 1: stronger edits, ES and PS; < 1: more local, NS);
    # one number for all edited matrices, or {module name: scale} per matrix (the others: 1.0);
    # None: the scale saved with the editor (calibrated on validation edits; 1.0 if none was saved)
    alpha_scale: float | dict[str, float] | None = None
    # edit time only (not in the paper): keep the update off the layer inputs of the edit's template filled
    # with this many stand-in subjects (the nearest to the edit's own in stand_ins.SUBJECTS); 0: the paper's
    # update; None: the number saved with the editor (0 if none was saved)
    protect_neighbours: int | None = None
    # edit time only: the projection's ridge, relative to the stand-in keys' mean squared norm (smaller: the
    # stand-ins' outputs move less, and so may the edit's); None: the saved value (1.0 if none was saved)
    protect_ridge: float | None = None
    # edit time only (not in the paper): in a batch of k > 1 edits, correct the summed update so that no
    # edit moves the other edits' tokens (``isolate_edits``), with this ridge (relative; larger: nearer the
    # plain sum); 0: the paper's plain sum; None: the value saved with the editor (0 if none was saved)
    isolate_batch: float | None = None
    c_edit: float = 0.1  # weight of the edit NLL in the training loss
    c_loc: float = 1.0  # weight of the locality KL in the training loss
    # weight of the hard-negative term (not in the paper; 0 = the paper's loss): on neighbourhood prompts the
    # rise of log p(target_new) - log p(answer) where the two answers first differ, which NS counts
    c_nb: float = 0.0
    lr: float = 1e-4  # Adam learning rate of the editor network (training)
    lr_alpha: float = 1e-4  # Adam learning rate of the step sizes alpha_l (training)
    seed: int = 0  # initialisation of the editor network


# -- gradient decomposition ----------------------------------------------------------------------------


def decompose(
    model: nn.Module,
    task: Task,
    batch,
    modules: list[str],
    n_edit: int | None = None,
    owners: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token (u, delta) of each module for the summed per-edit loss of the first ``n_edit`` rows of
    ``batch`` (all rows if None), taken at the base weights: sum_t delta_t u_t^T = dL/dW (out, in).

    All-zero rows (padding, positions after the targets) are dropped; the factors are detached. ``owners``,
    if given, is filled with each module's row -> index of the batch row (the edit) it came from.
    """
    params = dict(model.named_parameters())
    # The base weights as fresh leaves, so the layers' outputs require grad even though the model is frozen.
    leaves = {f"{m}.weight": params[f"{m}.weight"].detach().requires_grad_(True) for m in modules}
    with torch.enable_grad(), Trace(model, modules, capture_input=True) as tr:
        outputs = task.outputs(model, batch, params=leaves)
        loss = task.loss(outputs, batch)[:n_edit].sum()  # each edit's own loss, summed over edits
        deltas = torch.autograd.grad(loss, [tr[m].output for m in modules])
    factors = {}
    for m, delta in zip(modules, deltas, strict=True):
        u, delta = tr[m].input.detach().flatten(0, -2), delta.detach().flatten(0, -2)
        keep = (u != 0).any(-1) & (delta != 0).any(-1)
        factors[m] = (u[keep].float(), delta[keep].float())
        if owners is not None:  # the layer's input is (batch, [positions...,] features)
            shape = tr[m].input.shape
            per_row = math.prod(shape[1:-1])
            owners[m] = torch.arange(shape[0], device=keep.device).repeat_interleave(per_row)[keep]
    return factors


def gradient_factors(
    model: nn.Module,
    task: Task,
    edits: list,
    modules: list[str],
    owners: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(u, delta) per token of each module for the edits' loss (see ``decompose``)."""
    return decompose(model, task, task.edit_batch(edits), modules, owners=owners)


def isolate_edits(
    left: torch.Tensor, right: torch.Tensor, keys: torch.Tensor, owners: torch.Tensor, ridge: float
) -> torch.Tensor:
    """The output factor of a batch's summed update, changed as little as possible so that each edit's own
    tokens stop moving by the other edits' parts (not in the paper; ``isolate_batch``).

    left (out, N) @ right (N, in) sums the edits' updates, row t of both factors from edit owners[t]; keys
    (N, in) are the layer's inputs at those tokens. With P = right @ keys^T (N, N), the summed update moves
    key t by (left P)_t, of which the other edits' rows give the cross-talk X_t. The correction C minimises
    |C|^2 lam + |C P + X|^2 (lam = ridge x the mean squared column norm of P): C = -X (P^T P + lam I)^-1 P^T.
    ridge -> 0 removes the cross-talk wherever the keys allow it (no more keys than inputs); larger ridges
    stay nearer the plain sum. The input directions (right, what the editor learned) and the rank are kept.
    """
    dtype = left.dtype
    left, right, keys = left.double(), right.double(), keys.double()  # P^T P squares P's condition number
    p = right @ keys.T
    crosstalk = left @ (p * (owners[:, None] != owners[None, :]))
    gram = p.T @ p
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    return (left - torch.linalg.solve(gram, crosstalk.T).T @ p.T).to(dtype)


# -- the editor network --------------------------------------------------------------------------------


class ResidualLowRank(nn.Module):
    """z + U relu(V (s_l * z + o_l) + b): the identity while U = 0; one scale and shift per edited layer."""

    def __init__(self, dim: int, rank: int, n_layers: int):
        super().__init__()
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.V = nn.Parameter(torch.empty(rank, dim))
        nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))  # nn.Linear's default
        self.b = nn.Parameter(torch.zeros(rank))
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, dim))

    def forward(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        x = z * self.scale[layer] + self.shift[layer]
        return z + torch.relu(x @ self.V.T + self.b) @ self.U.T


class GradientTransform(nn.Module):
    """The network of every edited matrix of one shape (out, in): normalise (u, delta); two residual layers"""

    def __init__(self, d_out: int, d_in: int, n_layers: int, rank: int):
        super().__init__()
        self.d_in = d_in
        self.layer1 = ResidualLowRank(d_in + d_out, rank, n_layers)
        self.layer2 = ResidualLowRank(d_in + d_out, rank, n_layers)
        # Running statistics of the training tokens (Welford, float64); count < 2: mean 0 / std 1 (identity).
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        for name, d in (("u", d_in), ("delta", d_out)):
            self.register_buffer(f"{name}_mean", torch.zeros(d, dtype=torch.float64))
            self.register_buffer(f"{name}_m2", torch.zeros(d, dtype=torch.float64))

    @torch.no_grad()
    def update_stats(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Welford's running mean and variance, merging a whole batch of tokens at once (Chan et al.)."""
        n_b = u.shape[0]
        if n_b == 0:
            return
        n_a = float(self.count)
        n = n_a + n_b
        for name, x in (("u", u), ("delta", delta)):
            x = x.double()
            mean, m2 = getattr(self, f"{name}_mean"), getattr(self, f"{name}_m2")
            batch_mean = x.mean(0)
            diff = batch_mean - mean
            m2 += ((x - batch_mean) ** 2).sum(0) + diff**2 * (n_a * n_b / n)
            mean += diff * (n_b / n)
        self.count += n_b

    def std(self, name: str) -> torch.Tensor:
        m2 = getattr(self, f"{name}_m2")
        if self.count < 2:
            return torch.ones_like(m2)
        return (m2 / (self.count - 1)).sqrt().clamp(min=1e-6)

    def normalise(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return (x - getattr(self, f"{name}_mean").float()) / self.std(name).float()

    def forward(self, u: torch.Tensor, delta: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            self.update_stats(u, delta)
        z = torch.cat([self.normalise(u, "u"), self.normalise(delta, "delta")], -1)
        g = self.layer2(self.layer1(z, layer), layer)
        return g[:, : self.d_in], g[:, self.d_in :]


class MENDNetwork(nn.Module):
    """The editor networks (one per weight shape, or per group of modules: ``groups``) and the step sizes
    alpha_l (one per edited matrix)."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        rank: int,
        alpha_init: float,
        groups: dict[str, list[str]] | None = None,
    ):
        super().__init__()
        self.shapes = dict(shapes)  # module name -> (out, in)
        if groups is None:  # the paper: one network per shape
            groups = {}
            for name, (d_out, d_in) in self.shapes.items():
                groups.setdefault(f"{d_out}x{d_in}", []).append(name)
        self.groups = {key: list(names) for key, names in groups.items()}  # network key -> its modules
        self.slot = {name: (key, i) for key, names in groups.items() for i, name in enumerate(names)}
        self.nets = nn.ModuleDict(
            {
                key: GradientTransform(*self.shapes[names[0]], len(names), rank)
                for key, names in groups.items()
            }
        )
        self.alpha = nn.Parameter(torch.full((len(self.shapes),), float(alpha_init)))

    def forward(
        self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (u, delta)} -> {module: (left (out, n), right (n, in))} with W~ = W + left @ right.

        DESCENT: W~ = W - alpha * sum_t delta~_t u~_t^T. (The authors' public code adds the update instead;
        its author confirmed that sign is a bug. A test checks that one untrained step lowers the edit loss.)
        """
        out = {}
        for j, name in enumerate(self.shapes):
            key, layer = self.slot[name]
            u, delta = factors[name]
            u_t, delta_t = self.nets[key](u, delta, layer)
            out[name] = (-self.alpha[j] * delta_t.T, u_t)
        return out


# -- the editor ----------------------------------------------------------------------------------------


@register
class MEND(Editor):
    name = "mend"
    Config = MENDConfig
    strengthen = {"alpha_scale": 1.5}  # verify=True: the step-size ladder (README: MEND step scales)
    any_model = True

    def __init__(
        self, model: nn.Module, tokenizer, config: MENDConfig, network: MENDNetwork | None = None, task=None
    ):
        super().__init__(model, tokenizer, config, task)
        self.network = network
        if network is None:
            self.load(self._editor_dir())
        self.network.eval()
        self._stand_ins: StandIns | None = None  # made at creation if protecting, else at the first such edit
        # A protecting editor prepares its stand-in pool now, so that its first edit costs what every edit
        # costs (the pool's pass is setup, like loading the editor); a bad setting is reported by edit().
        try:
            protects = self.protected_subjects() > 0
        except ValueError:
            protects = False
        if protects:
            self.stand_ins.pool_vectors()

    @classmethod
    def for_training(cls, model: nn.Module, tokenizer, config: MENDConfig, task=None) -> MEND:
        """A MEND editor with a fresh (identity) network, to be trained with ``training.train_editor``."""
        task = resolve_task(task, model, tokenizer)
        modules = list(config.modules) if config.modules else default_modules(model, task, config.num_blocks)
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            network = MENDNetwork(
                {m: linear_shape(model.get_submodule(m)) for m in modules},
                config.rank,
                config.alpha_init,
                config.groups,
            )
        return cls(model, tokenizer, config, network, task)

    # -- editing ----------------------------------------------------------------------------------------
    @property
    def step_sizes(self) -> torch.Tensor:
        """The step sizes an edit uses: the learned alpha_l times the edit-time ``alpha_scale``."""
        alpha = self.network.alpha.detach()
        return alpha * torch.tensor(list(self.scales.values()), dtype=alpha.dtype, device=alpha.device)

    @property
    def scales(self) -> dict[str, float]:
        """The edit-time ``alpha_scale`` of each edited matrix."""
        scale, modules = self.config.alpha_scale, list(self.network.shapes)
        if not isinstance(scale, dict):
            return dict.fromkeys(modules, 1.0 if scale is None else float(scale))
        unknown = sorted(set(scale) - set(modules))
        if unknown:
            raise ValueError(
                f"alpha_scale names modules this editor does not edit: {unknown}; it edits {modules}"
            )
        return {m: float(scale.get(m, 1.0)) for m in modules}

    def compute_deltas(self, requests: list) -> dict[str, Delta]:
        n, isolate = self.protected_subjects(), self.batch_isolation()  # bad settings fail before any pass
        modules = list(self.network.shapes)
        # The stand-ins are chosen by the subjects' inputs to one early module, watched in the gradient pass.
        watched = [self.stand_ins.similarity_module] if n else []
        isolate = isolate if len(requests) > 1 else 0.0  # one edit has no other edits to isolate from
        owners: dict[str, torch.Tensor] | None = {} if isolate else None
        with Trace(self.model, watched, capture_input=True, capture_output=False, detach=True) as seen:
            factors = gradient_factors(self.model, self.task, requests, modules, owners)
        with torch.no_grad():
            updates = self.network(factors)
            prompts = self.stand_ins.prompts(requests, n, seen[watched[0]].input) if n else []
            if prompts:
                keys = self.stand_ins.keys(prompts, modules)
                ridge = 1.0 if self.config.protect_ridge is None else self.config.protect_ridge
                updates = {
                    m: (left, project_away(right, keys[m], ridge)) for m, (left, right) in updates.items()
                }
            if isolate:
                updates = {
                    m: (isolate_edits(left, right, factors[m][0], owners[m], isolate), right)
                    for m, (left, right) in updates.items()
                }
        scale = self.scales
        pairs = (linear_delta(self.model, m, scale[m] * left, right) for m, (left, right) in updates.items())
        return dict(pairs)

    @property
    def stand_ins(self) -> StandIns:
        """Chooses the stand-in neighbours (``protect_neighbours``) of this editor's model."""
        if self._stand_ins is None:
            self._stand_ins = StandIns(self.model, self.tokenizer)
        return self._stand_ins

    def protected_subjects(self) -> int:
        """``protect_neighbours``, checked (with ``protect_ridge``) against this editor's model."""
        n, ridge = self.config.protect_neighbours or 0, self.config.protect_ridge
        if not isinstance(n, int) or not 0 <= n <= len(SUBJECTS):
            raise ValueError(
                f"protect_neighbours must be a whole number from 0 to {len(SUBJECTS)}, got {n!r}"
            )
        if ridge is not None and not (isinstance(ridge, (int, float)) and ridge > 0):
            raise ValueError(f"protect_ridge must be a number > 0, got {ridge!r}")
        if n and (not self.task.is_language_model or is_seq2seq(self.model)):
            raise ValueError(
                "protect_neighbours works for decoder-only language models only (it fills the edit's "
                "template with other subjects); set protect_neighbours=0 for this model"
            )
        return n

    def batch_isolation(self) -> float:
        """``isolate_batch``, checked: the ridge of ``isolate_edits``, 0 for the paper's summed update."""
        ridge = self.config.isolate_batch or 0.0
        if isinstance(ridge, bool) or not isinstance(ridge, int | float) or ridge < 0:
            raise ValueError(f"isolate_batch must be a number >= 0 (0: off), got {ridge!r}")
        return float(ridge)

    def stand_in_prompts(self, requests: list) -> list[str]:
        """The stand-in prompts of these requests (see ``stand_ins``); none if ``protect_neighbours`` is 0."""
        n = self.protected_subjects()
        return self.stand_ins.prompts(requests, n) if n else []

    # -- training (the trainer's learned-editor interface) ---------------------------------------------
    def fold_alpha_scale(self) -> None:
        """Move the edit-time ``alpha_scale`` into the learned step sizes (alpha x scale, then no scale): the
        editor edits exactly as before. ``train --init`` does this, so that fine-tuning a calibrated
        editor trains the update at the size it is deployed with (the training loss uses no scale)."""
        with torch.no_grad():
            self.network.alpha.copy_(self.step_sizes)
        self.config.alpha_scale = None

    def train(self, mode: bool = True) -> MEND:
        self.network.train(mode)
        return self

    def param_groups(self) -> list[dict]:
        nets = [p for name, p in self.network.named_parameters() if name != "alpha"]
        return [
            {"params": nets, "lr": self.config.lr},
            {"params": [self.network.alpha], "lr": self.config.lr_alpha},
        ]

    def training_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """c_edit * loss(targets | edit inputs, equivalent inputs; W~) + c_loc * KL(p_W || p_W~) on locality.

        ``batch``: a MetaBatch (language models: the KL is the neighbourhood answers' mean plus the
        unrelated texts' mean) or a TensorMetaBatch (any model, with a Task).
        """
        c, task = self.config, self.task
        factors = decompose(self.model, task, batch.edit, list(self.network.shapes))
        stats: dict[str, float] = {}
        with torch.set_grad_enabled(self.network.training):
            params = dict(self.model.named_parameters())
            edited = {}
            for m, (left, right) in self.network(factors).items():
                name, delta = linear_delta(self.model, m, left, right)
                edited[name] = params[name] + delta.dense()
            gen_out = task.outputs(self.model, batch.gen, params=edited)
            gen_loss = task.loss(gen_out, batch.gen)
            edit_loss = gen_loss[: batch.n_new].mean()
            loss = c.c_edit * edit_loss
            stats |= {"edit_nll": edit_loss.item(), "alpha": self.network.alpha.mean().item()}
            if batch.loc is not None:
                with torch.no_grad():
                    before = task.outputs(self.model, batch.loc)
                after = task.outputs(self.model, batch.loc, params=edited)
                loss = loss + c.c_loc * task.locality_penalty(before, after, batch, stats, "kl")
                if c.c_nb and getattr(batch, "nb_new_token", None) is not None and batch.n_neighbours:
                    loss = loss + c.c_nb * task.neighbour_margin(before, after, batch, stats)
        task.success_stats(gen_out, gen_loss.detach(), batch, stats)
        return loss, stats

    # -- files ------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write mend.json (fingerprint, layers, hparams), mend.safetensors (network, alphas, stats)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = editor_meta(self, FORMAT_VERSION, self.network.shapes)
        tensors = {
            k: (v.to(dtype) if v.is_floating_point() and v.dtype != torch.float64 else v).contiguous()
            for k, v in self.network.state_dict().items()
        }
        return write_editor_files(directory, "mend", meta, tensors)

    def load(self, directory: str | Path) -> None:
        """Load a trained editor; it must have been trained for this very model (same fingerprint)."""
        meta, tensors = read_editor_files(directory, "mend", self.model, "MEND editor", EditorNotTrainedError)
        self.config = with_saved_hparams(self.config, meta, keep=EDIT_TIME_FIELDS)
        if self.network is None:
            shapes = {m: tuple(s) for m, s in meta["shapes"].items()}
            self.network = MENDNetwork(shapes, self.config.rank, self.config.alpha_init, self.config.groups)
        state = self.network.state_dict()
        self.network.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items() if k in state})

    def _editor_dir(self) -> Path:
        if self.config.editor_path:
            return Path(self.config.editor_path)
        fp = fingerprint(self.model)
        for config_file in sorted(EDITORS_DIR.glob(f"*/{CONFIG_FILE}")):
            if json.loads(config_file.read_text()).get("fingerprint") == fp:
                return config_file.parent
        raise EditorNotTrainedError(
            f"no trained MEND editor for this model (fingerprint {fp}): train one with "
            "`modeledit train mend --model MODEL --data TRAIN.json --out DIR`, then pass editor_path=DIR "
            "(on the command line: --set editor_path=DIR)"
        )


def combine(editors: list[MEND]) -> MEND:
    """One editor that makes the edits of several trained editors of the same model at once.

    The editors must edit disjoint layers (say blocks 20-22 and 27-29). Each keeps its own networks; its
    ``alpha_scale`` is folded into its step sizes, so the combined update is the sum of the editors' updates
    as they were configured (the combined editor's own ``alpha_scale`` then scales them all). Unlike applying
    them one after the other, the edit gradient is taken once, at the base weights, for all layers.
    Save the result with ``.save(directory)``; it loads and trains (``train --init``) like any editor.
    """
    if len(editors) < 2:
        raise ValueError("combine needs at least two MEND editors")
    first = editors[0]
    shapes: dict[str, tuple[int, int]] = {}
    groups: dict[str, list[str]] = {}
    sources: list[tuple[str, nn.Module]] = []  # (new network key, trained network) in order
    alphas = []
    for editor in editors:
        if editor.model is not first.model:
            raise ValueError("combined MEND editors must all edit the same model object")
        if editor.config.rank != first.config.rank:
            ranks = (first.config.rank, editor.config.rank)
            raise ValueError(f"combined MEND editors need one rank, got {ranks[0]} and {ranks[1]}")
        overlap = shapes.keys() & editor.network.shapes.keys()
        if overlap:
            raise ValueError(f"combined MEND editors must edit disjoint layers; both edit {sorted(overlap)}")
        shapes |= editor.network.shapes
        for key, names in editor.network.groups.items():
            new_key, n = key, 1
            while new_key in groups:  # two members with networks of one shape: keep both apart
                new_key, n = f"{key}_{n}", n + 1
            groups[new_key] = names
            sources.append((new_key, editor.network.nets[key]))
        alphas.append(editor.step_sizes)
    network = MENDNetwork(shapes, first.config.rank, first.config.alpha_init, groups)
    with torch.no_grad():
        for key, source in sources:
            network.nets[key].load_state_dict(source.state_dict())
        network.alpha.copy_(torch.cat(alphas))
    config = replace(first.config, editor_path=None, modules=list(shapes), groups=groups, alpha_scale=None)
    return MEND(first.model, first.tokenizer, config, network, first.task)
