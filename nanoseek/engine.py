"""Inference: continuous batching over the latent cache, batched sampling, and MTP speculative decoding (one
engine for generate, chat, the server, evaluation and GRPO rollouts).

- The model allocates its own cache (`model.new_cache`); for MLA it holds, per layer, only what absorbed
  attention reads: the normed latent (kv_lora_rank) and the rotated shared key (qk_rope_head_dim) — 576 values
  per token per layer in V3 (V2 report §2.1, V3 report §2.1.1). The engine only moves its rows around.
- Continuous batching (iteration-level scheduling, Orca: Yu et al., OSDI 2022): `Batcher` owns a cache of
  max_batch rows; at every step boundary finished and cancelled requests leave, waiting ones join (their
  prompts prefilled together, right-padded), and one decode step runs over every active row, each at its own
  position. Each request keeps its own sampling parameters (vectorised per row) and its own generator.
- Same request, same seed → same tokens whatever else is in the batch: every row's distribution is computed
  from its own logits only, and a row draws one uniform per token from its own generator (none when greedy).
- `Engine.generate` (a static batch) runs on a Batcher sized to the batch; repeated prompts (a GRPO group)
  share one prefill.
- Speculative decoding (V3 §5.4.3) stays a static-batch feature: MTP depth 1 drafts the token after next; one
  main forward over [pending, draft] verifies it. Greedy output equals plain greedy decoding; sampling uses the
  standard acceptance rule (accept with min(1, p/q), else resample from max(0, p - q)), which preserves the
  target distribution.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .decode_step import DecodeStep
from .model import Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer)


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the (filtered) target distribution
    text: str = ""
    finish_reason: str = "length"  # "eos", "stop" or "length"


@dataclass
class Stats:
    """What one `generate` call did: tokens produced, wall time, and MTP drafts proposed / accepted."""

    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    # per decode forward, the prompt index of each of its rows (rows leave as their sequences finish): how full
    # the batch ran, and what routing.RoutingCapture needs to rebuild each sequence's experts
    decode_rows: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Completions(list):
    """What Engine.generate returns: the Generation of each prompt, in order, plus the call's `stats`."""

    def __init__(self, generations: list[Generation], stats: Stats):
        super().__init__(generations)
        self.stats = stats


def sequence_seed(seed: int, index: int) -> int:
    """The sampling seed of sequence `index` of a run seeded with `seed` (every stage derives its seeds here)."""
    return seed * 1_000_003 + index


# ----------------------------------------------------------------------------- sampling


def row_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
              top_p: torch.Tensor) -> torch.Tensor:
    """Per-row sampling distributions (B, V) from logits (B, V) and per-row temperature, top-k (0 = off) and
    top-p (1 = off); one-hot argmax where temperature is 0. Each row is computed from its own values only (a
    filter one row uses leaves the others bit-identical), so a row's distribution never depends on its batch."""
    V = logits.shape[-1]
    greedy = temperature <= 0
    x = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    # greedy rows end one-hot whatever their filters: top-k and top-p (a sort where the distribution is flat)
    # are computed for the sampled rows only
    use_k = (top_k > 0) & (top_k < V) & ~greedy
    if bool(use_k.any()):
        k = torch.where(use_k, top_k, 1)  # the k-th largest value: topk, not a sort of the whole vocabulary
        kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        x = x.masked_fill((x < kth) & use_k[:, None], float("-inf"))
    probs = x.softmax(-1)
    use_p = (top_p < 1.0) & ~greedy
    if bool(use_p.any()):
        rows = use_p.nonzero().squeeze(1)
        every = len(rows) == len(probs)
        sub = probs if every else probs[rows]
        nucleus = sub.masked_fill(~nucleus_mask(sub, top_p[rows]), 0.0)
        nucleus = nucleus / nucleus.sum(-1, keepdim=True)
        probs = nucleus if every else probs.index_copy(0, rows, nucleus)
    if bool(greedy.any()):
        probs = torch.where(greedy[:, None], torch.nn.functional.one_hot(logits.argmax(-1), V).float(), probs)
    return probs


def nucleus_mask_reference(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p's kept tokens (B, V) bool: the smallest prefix of the tokens sorted by probability (ties: lower id
    first) whose mass reaches top_p; a token is dropped when the mass before it already exceeds top_p."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p[:, None]
    return torch.ones_like(probs, dtype=torch.bool).scatter(-1, order, ~drop)


def nucleus_mask(probs: torch.Tensor, top_p: torch.Tensor, candidates: int = 64) -> torch.Tensor:
    """`nucleus_mask_reference` without sorting the vocabulary: the same rule over the `candidates` most
    likely tokens, exact for every row whose nucleus provably lies inside them; the other rows (flat
    distributions) take the reference. Sorting 800 rows of 4,096 took ~100 ms per decoded token on our CPUs,
    topk ~10 ms.

    Equal to the reference bit for bit: the candidates' probabilities are the first `candidates` of the sorted
    ones, and cumsum adds in order (in double on CPU), so their cumulative sums are the same numbers. A row is
    exact when (a) the mass of all candidates exceeds top_p by a margin far above rounding, so every later
    token is dropped, and (b) the last kept probability is above the smallest candidate's, so no token of
    equal probability was left outside (ties are broken by token id in both)."""
    V = probs.shape[-1]
    if V <= candidates:
        return nucleus_mask_reference(probs, top_p)
    vals, ids = probs.topk(candidates, dim=-1)  # descending; ties in no particular order
    ids, by_id = ids.sort(-1)
    vals, order = vals.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)  # ties: lower id first
    ids = ids.gather(-1, order)
    mass = vals.cumsum(-1)
    drop = mass - vals > top_p[:, None]
    position = torch.arange(candidates, device=probs.device)
    last_kept = vals.gather(-1, torch.where(drop, 0, position).amax(-1, keepdim=True))  # position 0 is never dropped
    exact = (mass[:, -1:] > top_p[:, None] + 1e-5) & (last_kept > vals[:, -1:])
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, ids, ~drop)
    inexact = (~exact[:, 0]).nonzero().squeeze(1)
    if inexact.numel():
        keep[inexact] = nucleus_mask_reference(probs[inexact], top_p[inexact])
    return keep


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Sampling distribution (B, V) after temperature, top-k and top-p; one-hot argmax when greedy."""
    B, device = logits.shape[0], logits.device
    return row_probs(logits, torch.full((B,), float(p.temperature), device=device),
                     torch.full((B,), int(p.top_k), device=device), torch.full((B,), float(p.top_p), device=device))


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative probability first reaches u (one uniform per row)."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u.to(probs.device) * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    return idx.clamp(max=probs.shape[-1] - 1)


def _draw(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row of a static batch: inverse-CDF sampling with one uniform from each row's generator
    (argmax when every distribution is one-hot, i.e. greedy, so greedy decoding consumes no randomness)."""
    if bool((probs.amax(-1) == 1.0).all()):
        return probs.argmax(-1)
    return _inverse_cdf(probs, torch.cat([torch.rand(1, generator=g) for g in gens]))


def _draw_one(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(_draw(probs.unsqueeze(0), [gen])[0])


def _logp(probs: torch.Tensor, token) -> float:
    return float(probs[int(token)].clamp_min(1e-30).log())


# ----------------------------------------------------------------------------- requests


@dataclass(eq=False)
class Request:
    """One sequence: prompt, sampling parameters, its own generator, and what it has produced so far.

    `listener(request, token)` is called in the stepping thread after each new token (and with token None when
    a cancelled request leaves). `cancel()` may be called from any thread; the slot is freed at the next step.
    With top_logprobs = n (0-20) the raw model log-probability (log-softmax of the logits, before temperature
    and filters) of each token and of the n most likely tokens is recorded too."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    top_logprobs: int | None = None
    listener: Callable | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # under the filtered sampling distribution
    raw_logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""  # decoded so far (eos excluded); may run past a stop string within the last token
    finish_reason: str | None = None  # None while running; then "eos", "stop", "length" or "cancelled"
    cancelled: bool = False

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        self.pending, self.pos = 0, 0  # the last token (not yet in the cache) and the position it goes to
        self._prefix = self._read = 0  # incremental detokenisation offsets into tokens

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def generation(self) -> Generation:
        return Generation(list(self.prompt), self.tokens, self.logprobs, self.text, self.finish_reason or "length")


def _detokenize(tokenizer, r: Request) -> None:
    """Extend r.text by the newest token: decode a short window and keep what it adds, waiting while the
    window ends inside a multi-byte character (the incremental scheme vLLM and TGI use). Never called for eos."""
    before = tokenizer.decode(r.tokens[r._prefix:r._read])
    after = tokenizer.decode(r.tokens[r._prefix:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
        r.text += after[len(before):]
        r._prefix, r._read = r._read, len(r.tokens)


def emit(tokenizer, r: Request, token: int, logprob: float) -> None:
    """Append a token to r and decide whether r is finished (eos, a stop string, or max_new_tokens)."""
    r.tokens.append(token)
    r.logprobs.append(logprob)
    if tokenizer is not None:
        seen = len(r.text)
        if token == tokenizer.eos_id:
            r.finish_reason = "eos"
        else:
            _detokenize(tokenizer, r)
            if any(s in r.text[max(0, seen - len(s) + 1):] for s in r.params.stop):
                r.finish_reason = "stop"
        if r.done:  # the exact text, should the incremental one still wait on an incomplete character
            ids = r.tokens[:-1] if r.finish_reason == "eos" else r.tokens
            full = tokenizer.decode(ids)
            r.text = full if full.startswith(r.text) else r.text
    if not r.done and len(r.tokens) >= r.params.max_new_tokens:
        r.finish_reason = "length"
    if r.listener is not None:
        r.listener(r, token)


def prefill(model: Transformer, ids: list[list[int]], cache):
    """Prompts through the model once each, right-padded, into cache rows 0..B-1: repeated prompts (a GRPO
    group) share one prefill whose latents are copied to every row that asked for it (main layers only).
    Returns tokens (B, L), hidden states (B, L, D) and lengths (B,)."""
    B, L = len(ids), max(len(p) for p in ids)
    device = model.embed.weight.device
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, p in enumerate(ids):
        tokens[b, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in ids], device=device)
    unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    positions = torch.arange(L, device=device).expand(unique.shape[0], L)
    if unique.shape[0] == B:
        return tokens, model.hidden_cached(tokens, positions[:B], cache.main), lengths
    shared = model.new_cache(unique.shape[0], L)
    h = model.hidden_cached(unique, positions, shared.main)  # right padding is never attended to
    cache.copy_rows(list(range(B)), shared, inverse.tolist())
    return tokens, h[inverse], lengths


# ----------------------------------------------------------------------------- continuous batching


class Batcher:
    """Continuous batching over one preallocated cache of max_batch rows × max_len positions.

    Row i of the cache belongs to active[i]; a leaving request's row is taken over by the last active row, so
    the active rows stay a prefix of the cache and a decode step costs what the active rows need. `submit` and
    `Request.cancel` may be called from other threads than `step`; everything else belongs to the stepping
    thread.
    """

    def __init__(self, model: Transformer, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 step: DecodeStep | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.max_len = max_len or model.cfg.max_seq_len
        # one token per row: the folded decode step where the model has one (decode_step.py), else the model's own;
        # a step passed in is the caller's to refresh when the weights change (Engine.generate does)
        self.decode_step = step or DecodeStep.build(model) or model.hidden_cached
        self.cache = model.new_cache(max_batch, self.max_len)
        self.active: list[Request] = []
        self.waiting: deque[Request] = deque()
        self.trace: list[list[Request]] | None = None  # when a list: the rows of every decode forward, in order
        self._lock = threading.Lock()  # guards `waiting` against submissions from other threads

    def check(self, r: Request) -> None:
        """ValueError naming what is wrong with a request that cannot run here."""
        if not r.prompt:
            raise ValueError("empty prompt")
        if len(r.prompt) + r.params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(r.prompt)} tokens + {r.params.max_new_tokens} new tokens exceeds the "
                             f"model's context of {self.max_len} tokens")
        if r.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")

    def submit(self, r: Request) -> None:
        self.check(r)
        with self._lock:
            self.waiting.append(r)

    def drain(self) -> list[Request]:
        """Remove every request, running or waiting, and return them (after a step failed)."""
        with self._lock:
            out, self.active, self.waiting = self.active + list(self.waiting), [], deque()
        return out

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    @torch.inference_mode()  # no autograd bookkeeping at all: ~5-10% of a decode step here (docs/results/decode.md)
    def step(self) -> None:
        """One step boundary: leavers leave, newcomers join (prefill + first token), then every active row
        decodes one token."""
        self._release()
        self._admit()
        self._release()
        if self.active:
            self._decode()

    def _release(self) -> None:
        with self._lock:  # cancelled requests that never got a row leave the queue too
            gone = [r for r in self.waiting if r.cancelled]
            if gone:
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for r in gone:
            self._leave(r)
        i = 0
        while i < len(self.active):
            r = self.active[i]
            if not r.done and r.cancelled:
                self._leave(r)
            if not r.done:
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:  # the last row moves into the freed slot
                self.cache.copy_rows([i], self.cache.rows(last, last + 1), [0])
                self.active[i] = self.active[last]
            self.active.pop()

    @staticmethod
    def _leave(r: Request) -> None:
        r.finish_reason = "cancelled"
        if r.listener is not None:
            r.listener(r, None)

    def _admit(self) -> None:
        with self._lock:
            new = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.active)))]
        if not new:
            return
        start = len(self.active)
        _, h, lengths = prefill(self.model, [r.prompt for r in new], self.cache.rows(start, start + len(new)))
        self.active += new
        for r in new:
            r.pos = len(r.prompt)
        self._sample(new, self.model.head(h[torch.arange(len(new)), lengths - 1]))

    def _decode(self) -> None:
        device = self.model.embed.weight.device
        tokens = torch.tensor([[r.pending] for r in self.active], device=device)
        positions = torch.tensor([[r.pos] for r in self.active], device=device)
        if self.trace is not None:
            self.trace.append(list(self.active))
        h = self.decode_step(tokens, positions, self.cache.rows(0, len(self.active)).main)[:, 0]
        for r in self.active:
            r.pos += 1
        self._sample(self.active, self.model.head(h))

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> None:
        """One token for each row from its own distribution and generator."""
        device = logits.device
        p = [r.params for r in rows]
        probs = row_probs(logits, torch.tensor([q.temperature for q in p], device=device),
                          torch.tensor([q.top_k for q in p], device=device),
                          torch.tensor([q.top_p for q in p], device=device))
        token = probs.argmax(-1)
        sampled = [i for i, q in enumerate(p) if q.temperature > 0]
        if sampled:
            u = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled])
            token[sampled] = _inverse_cdf(probs[sampled], u)
        logp = probs.gather(1, token[:, None]).squeeze(1).clamp_min(1e-30).log().tolist()
        raw = self._raw_logprobs(rows, logits, token)
        for i, (r, t) in enumerate(zip(rows, token.tolist())):
            r.pending = t
            if i in raw:
                r.raw_logprobs.append(raw[i][0])
                r.top.append(raw[i][1])
            emit(self.tokenizer, r, t, logp[i])

    @staticmethod
    def _raw_logprobs(rows: list[Request], logits: torch.Tensor, token: torch.Tensor) -> dict:
        """{row: (log p(token), [(id, log p)] of the n most likely)} for the rows that asked for log-probs."""
        want = [i for i, r in enumerate(rows) if r.top_logprobs is not None]
        if not want:
            return {}
        logp = logits[want].float().log_softmax(-1)
        chosen = logp.gather(1, token[want][:, None]).squeeze(1).tolist()
        k = max(rows[i].top_logprobs for i in want)
        best_p, best_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        return {i: (chosen[j], list(zip(best_i[j, :rows[i].top_logprobs].tolist(),
                                        best_p[j, :rows[i].top_logprobs].tolist())))
                for j, i in enumerate(want)}


# ----------------------------------------------------------------------------- static batches


class Engine:
    """Batched generation from a Transformer (and optionally a Tokenizer for text prompts and stop strings)."""

    DECODES = ("folded", "compiled", "reference")

    def __init__(self, model: Transformer, tokenizer=None, decode: str = "folded"):
        """decode: how a step of one token per row runs. "folded": decode_step.DecodeStep (the default; models it
        does not serve use their own forward); "compiled": the same through torch.compile (minutes of compiling
        on a small CPU first; docs/results/decode.md says where it pays); "reference": the model's
        `hidden_cached`, what the folded step is tested against."""
        if decode not in self.DECODES:
            raise ValueError(f"decode must be one of {self.DECODES}, got {decode!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        fast = DecodeStep.build(model, compile=decode == "compiled") if decode != "reference" else None
        self.compiled = decode == "compiled" and fast is not None
        self.step = fast or model.hidden_cached

    @torch.inference_mode()  # what it returns is Python data: no tensor of this call reaches an autograd graph
    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | None = None,
                 speculative: bool = False, on_token=None, seeds: list[int] | None = None) -> Completions:
        """Complete each prompt (token ids or text). on_token(row, token_id) is called as tokens are produced.

        Row i samples from its own generator seeded with seeds[i] (default: derived from params.seed and i), so
        a prompt given the same seed gets the same tokens in any batch, and repeated prompts get different ones.
        Returns the generations (a list) with this call's `.stats` (tokens, time, drafts, the rows of every decode
        forward).
        """
        params = params or SamplingParams()
        ids = [self._encode(p) for p in prompts]
        self._check(ids, params, speculative)
        seeds = seeds if seeds is not None else [sequence_seed(params.seed, i) for i in range(len(ids))]
        t0, stats = time.perf_counter(), Stats()
        def listener(i):  # the static API's on_token(row, token)
            return (lambda r, tok: on_token(i, tok)) if on_token else None

        reqs = [Request(p, params, seed=s, listener=listener(i)) for i, (p, s) in enumerate(zip(ids, seeds))]
        if isinstance(self.step, DecodeStep):
            self.step.refresh()  # the weights may have changed since the last call (an RL update)
        if speculative:
            self._speculative(reqs, stats)
        else:
            need = max(len(p) for p in ids) + params.max_new_tokens + 1  # a compiled step keeps one cache length
            batcher = Batcher(self.model, self.tokenizer, max_batch=len(reqs), step=self.step,
                              max_len=self.model.cfg.max_seq_len if self.compiled else need)
            for r in reqs:
                batcher.submit(r)
            batcher.trace = []  # bounded by this call (a server's long-lived batcher leaves it off)
            while batcher.busy:
                batcher.step()
            index = {id(r): i for i, r in enumerate(reqs)}
            stats.decode_rows = [[index[id(r)] for r in rows] for rows in batcher.trace]
        gens = [r.generation() for r in reqs]
        stats.seconds = time.perf_counter() - t0
        stats.tokens = sum(len(g.tokens) for g in gens)
        for g in gens:
            if self.tokenizer is not None:
                g.text = self._text(g, params)
        return Completions(gens, stats)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer")
            prompt = self.tokenizer.encode(prompt)
        if not prompt:
            raise ValueError("empty prompt")
        return list(prompt)

    def _check(self, ids: list[list[int]], params: SamplingParams, speculative: bool) -> None:
        limit = self.model.cfg.max_seq_len
        longest = max(len(p) for p in ids)
        if longest + params.max_new_tokens + (2 if speculative else 0) > limit:
            raise ValueError(f"prompt of {longest} tokens + {params.max_new_tokens} new tokens exceeds the "
                             f"model's context of {limit} tokens")
        if speculative and self.model.cfg.n_mtp_layers == 0:
            raise ValueError("--speculative needs a checkpoint with an MTP module (n_mtp_layers > 0)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")

    def _text(self, g: Generation, params: SamplingParams) -> str:
        """The completion as text, ending after the first stop string if one was generated (it is kept)."""
        eos = self.tokenizer.eos_id
        text = self.tokenizer.decode([t for t in g.tokens if t != eos])
        ends = [text.find(s) + len(s) for s in params.stop if s in text]
        return text[: min(ends)] if ends else text

    # ------------------------------------------------------------------ speculative decoding
    def _speculative(self, reqs: list[Request], stats: Stats) -> None:
        model, B, params = self.model, len(reqs), reqs[0].params
        verify, mtp_cached = self.step, getattr(self.step, "mtp_cached", model.mtp_cached)
        generators = [r.generator for r in reqs]
        max_len = max(len(r.prompt) for r in reqs) + params.max_new_tokens + 3
        cache = model.new_cache(B, max_len, with_mtp=True)
        tokens, h, n = prefill(model, [r.prompt for r in reqs], cache)
        rows = torch.arange(B)
        history = torch.zeros(B, max_len, dtype=torch.long)  # every token, prompt and generated
        hidden = torch.zeros(B, max_len, model.cfg.dim, dtype=h.dtype)  # main hidden state at each position
        history[:, : tokens.shape[1]], hidden[:, : h.shape[1]] = tokens, h
        probs = filtered_probs(model.head(h[rows, n - 1]).float(), params)
        pending = _draw(probs, generators)  # token at position n, already part of the output
        for b, r in enumerate(reqs):
            emit(self.tokenizer, r, int(pending[b]), _logp(probs[b], pending[b]))
        history[rows, n] = pending
        mtp_cache = cache.mtp[0]
        if tokens.shape[1] > 1:  # MTP over the prompt: position i sees (h_i, t_{i+1})
            pos = torch.arange(tokens.shape[1] - 1).expand(B, -1)
            model.mtp_cached(1, h[:, :-1], tokens[:, 1:], pos, mtp_cache)
        while not all(r.done for r in reqs):
            # 1. draft t_{n+1} with MTP at positions n-2, n-1 (one of them may be recomputed: harmless)
            pos = torch.stack([(n - 2).clamp(min=0), n - 1], dim=1)
            h_mtp = mtp_cached(1, hidden[rows[:, None], pos], history[rows[:, None], pos + 1], pos, mtp_cache)
            q = filtered_probs(model.head(h_mtp[:, 1]).float(), params)
            draft = _draw(q, generators)
            # 2. verify: the main model on [pending, draft] at positions n, n+1
            pos = torch.stack([n, n + 1], dim=1)
            hv = verify(torch.stack([pending, draft], 1), pos, cache.main)
            p_all = filtered_probs(model.head(hv).float().flatten(0, 1), params).view(B, 2, -1)
            hidden[rows[:, None], pos] = hv
            n, pending = self._accept(reqs, n, draft, q, p_all, history, stats)

    def _accept(self, reqs, n, draft, q, p_all, history, stats):
        """Accept or reject each row's draft; returns the new (n, pending). Log-probs are the target's."""
        new_n, new_pending = n.clone(), torch.zeros_like(draft)
        for b, r in enumerate(reqs):
            if r.done:
                continue
            p0, d = p_all[b, 0], int(draft[b])
            stats.drafted += 1
            accepted, residual = speculative_check(p0, q[b], d, r.generator)
            if accepted:
                stats.accepted += 1
                emit(self.tokenizer, r, d, _logp(p0, d))
                history[b, n[b] + 1] = d
                target, draw_from, new_n[b] = p_all[b, 1], p_all[b, 1], n[b] + 2  # the bonus token
            else:
                target, draw_from, new_n[b] = p0, residual, n[b] + 1
            if r.done:
                continue
            token = _draw_one(draw_from, r.generator)
            new_pending[b] = token
            history[b, new_n[b]] = token
            emit(self.tokenizer, r, token, _logp(target, token))
        return new_n, new_pending


def speculative_check(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator):
    """Standard speculative sampling (Leviathan et al. 2023): accept a draft d ~ q with probability
    min(1, p(d)/q(d)); on rejection the next token must come from max(0, p - q) normalised. Together they
    sample exactly from p. For greedy (one-hot p and q) this accepts iff the draft is the target's argmax.
    Returns (accepted, the distribution to draw from if rejected)."""
    if torch.rand((), generator=generator) * q[draft] < p[draft]:
        return True, None
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return False, residual / total if total > 0 else p
