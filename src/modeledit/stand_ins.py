"""Stand-in neighbours: an edit's template filled with other subjects, and what they feed the edited layers.

CounterFact's neighbourhood prompts (NS) are other subjects with the edit's relation. They share the edit's
template, so the edited layers see nearly the same input at their last token, and an update that moves the
edit prompt moves them too. Filling the template with n stand-in subjects gives their inputs K at each
edited matrix (their *keys*); projecting the update's input factor R to

    R (I - K^T (K K^T + lam I)^-1 K)                                     (``project_away``)

leaves the edited matrices' outputs on the stand-ins (nearly) as they were, and the update keeps its rank.
Not in any paper: MEND uses it at edit time (``protect_neighbours``). The keys come from one forward pass of
the stand-in prompts up to the last edited layer (no LM head), in bfloat16 where the hardware computes it
natively (on this machine's CPU 1.3-1.6x faster than float32, with the same ES/PS/NS on 400 records). As
extra rows of the edit's own float32 gradient pass they cost +0.03 s per stand-in, against +0.01 s per prompt
plus a fixed ~0.045 s for a pass of their own (2 threads, default model); and they would have to be chosen
before that pass, by a pass of their own (0.02 s): for one stand-in, 5 ms saved of 0.17 s, not worth it.

Which stand-ins: the n subjects of ``SUBJECTS`` (well-known entities of many kinds) nearest to the edit's own
subject, by the cosine of the subject's last-token MLP input a quarter of the way up the decoder: the pool's
subjects alone, the edit's subject where it stands in its prompt, read off the edit's own gradient pass (so
that choosing costs no pass of its own; for the many prompts that start with the subject it is the same
vector as the subject alone). Near stand-ins guard the neighbours better than a fixed list: on CounterFact dev
records 500-699 / 700-899, 8 nearest gave NS 72.5 / 67.0 where 8 fixed ones gave 65.0 / 58.5 and the 8
farthest 59.0 / 60.0, at about the same ES and PS; similarity at blocks 8, 15 or 27 of 30 chose equally well,
at block 4 or on the input embeddings worse (NS -5).
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import architecture
from .hooks import Trace
from .lm import text_batch
from .stats import forward_until
from .trace import subject_span

# Many kinds of subject (people, places, firms, works, organisations, languages, sports), so that the
# nearest ones read like the relation's other subjects.
_SUBJECTS = (
    "Barack Obama|Paris|Toyota|Albert Einstein|Microsoft|Brazil|the Beatles|Tokyo|Pablo Picasso|"
    "Nokia|Germany|London|Google|William Shakespeare|Wolfgang Amadeus Mozart|Napoleon|Madonna|"
    "Apple|Sony|BMW|Canada|India|Italy|Egypt|Berlin|Moscow|Chicago|Sydney|Netflix|Intel|Samsung|"
    "Boeing|Nike|NASA|UNESCO|CNN|Oxford|Beyonce|Elvis Presley|Charles Darwin|Isaac Newton|"
    "Mahatma Gandhi|Pele|Roger Federer|Coldplay|Titanic|Friends|Windows|Linux|Python|Honda|"
    "Ferrari|Ford|Siemens|Nintendo|Facebook|Ikea|Lego|Sweden|Japan|Spain|Mexico|Vladimir Putin|"
    "Angela Merkel|Winston Churchill|Abraham Lincoln|Queen Elizabeth II|Nelson Mandela|"
    "Leonardo da Vinci|Vincent van Gogh|Ludwig van Beethoven|Johann Sebastian Bach|Frida Kahlo|"
    "Leo Tolstoy|Victor Hugo|Dante Alighieri|Miguel de Cervantes|Jane Austen|Charles Dickens|"
    "Mark Twain|Ernest Hemingway|Marie Curie|Nikola Tesla|Galileo Galilei|Sigmund Freud|"
    "Karl Marx|Plato|Confucius|Michael Jordan|Cristiano Ronaldo|Diego Maradona|Usain Bolt|"
    "Serena Williams|Tiger Woods|Michael Schumacher|Wayne Gretzky|Bob Dylan|Elton John|"
    "David Bowie|Freddie Mercury|Shakira|Celine Dion|Frank Sinatra|Johnny Cash|Edith Piaf|"
    "Taylor Swift|Eminem|ABBA|Metallica|U2|Radiohead|Pink Floyd|Tom Hanks|Meryl Streep|"
    "Charlie Chaplin|Marilyn Monroe|Audrey Hepburn|Alfred Hitchcock|Steven Spielberg|"
    "Akira Kurosawa|Sophia Loren|Gerard Depardieu|Star Wars|The Simpsons|Doctor Who|Harry Potter|"
    "The Godfather|Game of Thrones|Pokemon|Super Mario|Minecraft|Wikipedia|Amazon|Twitter|"
    "YouTube|Adobe|Oracle|IBM|Volkswagen|Mercedes-Benz|Fiat|Renault|Peugeot|Volvo|Hyundai|Airbus|"
    "Philips|Nestle|Heineken|Adidas|Gucci|Chanel|Pfizer|Shell|Real Madrid|FC Barcelona|"
    "Manchester United|Juventus|Bayern Munich|Ajax|the Red Cross|NATO|the United Nations|FIFA|"
    "Harvard University|the Sorbonne|Stanford University|France|Russia|China|Australia|Argentina|"
    "Poland|Norway|Finland|Greece|Turkey|Iran|Nigeria|Kenya|Vienna|Rome|Madrid|Amsterdam|"
    "Stockholm|Istanbul|Cairo|Mumbai|Beijing|Seoul|Toronto|Buenos Aires|Lisbon|Prague|Dublin|"
    "Helsinki|Athens|Warsaw|Budapest|Munich|Milan|Barcelona|Los Angeles|Boston|Texas|California|"
    "Bavaria|Scotland|Sicily|Quebec|Siberia|the Amazon River|the Nile|the Alps|Mount Everest|"
    "the Sahara|Lake Geneva|the Danube|the Mona Lisa|the Eiffel Tower|the Colosseum|the BBC|"
    "Al Jazeera|The New York Times|Le Monde|Reuters|Apollo 11|the Louvre|Buddhism|Islam|"
    "the Catholic Church|English|French|German|Spanish|Latin|Arabic|Japanese|Swahili|jazz|opera|"
    "chess|cricket|baseball|ice hockey|tennis|the piano|the violin|the guitar"
)
SUBJECTS = tuple(_SUBJECTS.split("|"))


def project_away(right: torch.Tensor, keys: torch.Tensor, ridge: float) -> torch.Tensor:
    """right (I - K^T (K K^T + lam I)^-1 K) for right (rank, in) and keys K (N, in), lam = ridge x mean |k|^2:
    the update's input factor without the keys' directions, so that (left @ right) k ~ 0 for each key k.

    Equal to lam right (K^T K + lam I)^-1 (push-through identity); the smaller of the two systems is solved.
    """
    keys = keys.to(right.dtype)
    n, d = keys.shape
    lam = ridge * keys.pow(2).sum(1).mean()
    if n <= d:
        gram = keys @ keys.T + lam * torch.eye(n, dtype=keys.dtype, device=keys.device)
        return right - (right @ keys.T) @ torch.linalg.solve(gram, keys)
    gram = keys.T @ keys + lam * torch.eye(d, dtype=keys.dtype, device=keys.device)
    return lam * torch.linalg.solve(gram, right.T).T


def native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively here (CUDA with bf16, or a CPU with AVX512-BF16 or AMX);
    elsewhere they are emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class StandIns:
    """Chooses the stand-in subjects of edit requests for a decoder-only language model."""

    def __init__(self, model: nn.Module, tokenizer, pool: tuple[str, ...] = SUBJECTS):
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        arch = architecture(model)
        self.similarity_module = arch.mlp_in(round(arch.num_layers / 4))[0]  # block 8 of 30
        self._pool_vectors: torch.Tensor | None = None
        device = next(model.parameters()).device
        # the precision of the stand-ins' forward passes (set float32 for exact keys)
        self.dtype = torch.bfloat16 if native_bfloat16(device) else torch.float32

    @torch.no_grad()
    def _run(self, texts: list[str], names: list[str]) -> dict[str, torch.Tensor]:
        """{module: its input (tokens, in) on each text}, for each text of a forward pass that stops at the
        last of ``names`` (no later blocks, no LM head)."""
        batch = text_batch(self.tokenizer, texts)
        device = next(self.model.parameters()).device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        inputs["use_cache"] = False  # no key/value cache to fill: 10% faster on the default model
        autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast, Trace(self.model, names, capture_input=True, capture_output=False, detach=True) as tr:
            forward_until(self.model, names[-1], inputs)
        lengths = batch["attention_mask"].sum(1).tolist()
        return {m: [tr[m].input[i, :n].float() for i, n in enumerate(lengths)] for m in names}

    def subject_vectors(self, subjects: list[str]) -> torch.Tensor:
        """Unit vectors of each subject alone: its last token's input to ``similarity_module``."""
        inputs = self._run(subjects, [self.similarity_module])[self.similarity_module]
        return torch.nn.functional.normalize(torch.stack([x[-1] for x in inputs]), dim=-1)

    def vectors_in_context(self, requests: list, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Unit vectors of each request's subject where it stands in the request's prompt: the input to
        ``similarity_module`` at the subject's last token (for a prompt that starts with the subject, the same
        as alone: the model is causal).

        ``inputs``: that module's input (rows, tokens, in) on a pass whose row i starts with the tokens of
        ``requests[i].text``, such as the edit's own gradient pass (then choosing costs no pass of its own);
        None: one pass of the prompts up to that module."""
        texts = [r.text for r in requests]
        if inputs is None:
            rows = self._run(texts, [self.similarity_module])[self.similarity_module]
        else:
            rows = inputs.detach().float()
        ends = [subject_span(self.tokenizer, t, r.subject)[1] - 1 for t, r in zip(texts, requests)]
        return torch.nn.functional.normalize(torch.stack([x[e] for x, e in zip(rows, ends)]), dim=-1)

    def pool_vectors(self) -> torch.Tensor:
        """The pool's subject vectors (``subject_vectors``), computed at the first call (one pass over the
        pool: ~0.5 s on the default model) and kept."""
        if self._pool_vectors is None:
            self._pool_vectors = self.subject_vectors(list(self.pool))
        return self._pool_vectors

    def nearest(self, vectors: torch.Tensor, n: int, exclude: set[str]) -> list[list[str]]:
        """For each subject vector (rows of ``vectors``), the ``n`` pool subjects nearest to it by cosine,
        none of them in ``exclude`` (case-insensitive).

        (``pool_vectors`` only choose the stand-ins; the keys are always taken at the current weights.)"""
        pool = self.pool_vectors()
        excluded = {s.lower() for s in exclude}
        orders = (vectors.to(pool) @ pool.T).argsort(-1, descending=True)
        return [
            [self.pool[i] for i in order if self.pool[i].lower() not in excluded][:n]
            for order in orders.tolist()
        ]

    def prompts(self, requests: list, n: int, inputs: torch.Tensor | None = None) -> list[str]:
        """Each request's template filled with the ``n`` pool subjects nearest to its subject, leaving out
        every subject of the batch; requests without a subject (in their prompt) get none. ``inputs``: see
        ``vectors_in_context`` (rows in the order of ``requests``)."""
        taken = {r.subject for r in requests if r.subject}
        has_subject = [r.subject and ("{}" in r.prompt or r.subject in r.prompt) for r in requests]
        rows = [i for i, has in enumerate(has_subject) if has]
        if not rows:
            return []
        with_subject = [requests[i] for i in rows]
        vectors = self.vectors_in_context(with_subject, None if inputs is None else inputs[rows])
        chosen = self.nearest(vectors, n, taken)
        filled = (r.template.replace("{}", s) for r, near in zip(with_subject, chosen) for s in near)
        return list(dict.fromkeys(filled))

    def keys(self, prompts: list[str], modules: list[str]) -> dict[str, torch.Tensor]:
        """{module: its inputs on all tokens of ``prompts`` (tokens, in)}; ``modules`` in forward order."""
        inputs = self._run(prompts, modules)
        return {m: torch.cat(inputs[m]) for m in modules}
