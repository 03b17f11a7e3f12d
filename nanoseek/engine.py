"""Inference: the latent KV cache, batched sampling, and MTP speculative decoding (one engine for generate, chat,
evaluation and GRPO rollouts).

- The model allocates its own cache (`model.new_cache`); for MLA it holds, per layer, only what absorbed
  attention reads: the normed latent (kv_lora_rank) and the rotated shared key (qk_rope_head_dim) — 576 values
  per token per layer in V3 (V2 report §2.1, V3 report §2.1.1). The engine only moves its rows around.
- Prompts of different lengths are right-padded into one prefill; each sequence then decodes at its own
  position, so a batch gives each prompt the tokens it would get alone.
- Sampling: greedy (temperature 0), temperature, top-k, top-p; one torch.Generator per sequence, seeded from
  (seed, index), so results do not depend on what else is in the batch.
- Speculative decoding (V3 §5.4.3): MTP depth 1 drafts the token after next; one main forward over
  [pending, draft] verifies it. Greedy output equals plain greedy decoding; sampling uses the standard
  acceptance rule (accept with min(1, p/q), else resample from max(0, p - q)), preserving the target distribution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Generations(list):
    """The Generation of each prompt, in order, plus the call's `stats`."""

    def __init__(self, generations: list[Generation], stats: Stats):
        super().__init__(generations)
        self.stats = stats


def sequence_seed(seed: int, index: int) -> int:
    """The sampling seed of sequence `index` of a run seeded with `seed` (every stage derives its seeds here)."""
    return seed * 1_000_003 + index


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Sampling distribution (B, V) after temperature, top-k and top-p; one-hot argmax when greedy."""
    if p.temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1)[0][..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _draw(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row: inverse-CDF sampling with one uniform from each row's own generator (argmax when
    the distribution is one-hot, i.e. greedy, so greedy decoding consumes no randomness)."""
    if bool((probs.amax(-1) == 1.0).all()):
        return probs.argmax(-1)
    u = torch.cat([torch.rand(1, generator=g) for g in gens]).to(probs.device)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    return idx.clamp(max=probs.shape[-1] - 1)


def _draw_one(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(_draw(probs.unsqueeze(0), [gen])[0])


class Engine:
    """Batched generation from a Transformer (and optionally a Tokenizer for text prompts and stop strings)."""

    def __init__(self, model: Transformer, tokenizer=None):
        self.model, self.tokenizer = model.eval(), tokenizer

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | None = None,
                 speculative: bool = False, on_token=None, seeds: list[int] | None = None) -> Generations:
        """Complete each prompt (token ids or text). on_token(row, token_id) is called as tokens are produced.

        Row i samples from its own generator seeded with seeds[i] (default: derived from params.seed and i), so
        a prompt given the same seed gets the same tokens in any batch, and repeated prompts get different ones.
        Returns the generations (a list) with this call's `.stats`.
        """
        params = params or SamplingParams()
        ids = [self._encode(p) for p in prompts]
        self._check(ids, params, speculative)
        seeds = seeds if seeds is not None else [sequence_seed(params.seed, i) for i in range(len(ids))]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        t0 = time.perf_counter()
        gens, stats = [Generation(prompt_tokens=p) for p in ids], Stats()
        on_token = on_token or (lambda row, tok: None)
        if speculative:
            self._speculative(ids, params, gens, generators, on_token, stats)
        else:
            self._plain(ids, params, gens, generators, on_token)
        stats.seconds = time.perf_counter() - t0
        stats.tokens = sum(len(g.tokens) for g in gens)
        for g in gens:
            if self.tokenizer is not None:
                g.text = self._text(g, params)
        return Generations(gens, stats)

    # ------------------------------------------------------------------ checks and text
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

    def _emit(self, g: Generation, row: int, token: int, logprob: float, params, on_token) -> bool:
        """Append a token; returns True if the sequence is now finished."""
        g.tokens.append(token)
        g.logprobs.append(logprob)
        on_token(row, token)
        eos = self.tokenizer.eos_id if self.tokenizer is not None else None
        if token == eos:
            g.finish_reason = "eos"
            return True
        if params.stop:
            tail = self.tokenizer.decode(g.tokens[-64:])
            if any(s in tail for s in params.stop):
                g.finish_reason = "stop"
                return True
        return len(g.tokens) >= params.max_new_tokens

    # ------------------------------------------------------------------ plain decoding
    def _prefill(self, ids: list[list[int]], cache):
        """Prompts through the model once each: repeated prompts (a GRPO group) share one prefill, and its
        latents are copied to every row that asked for it."""
        B, L = len(ids), max(len(p) for p in ids)
        device = self.model.embed.weight.device
        tokens = torch.zeros(B, L, dtype=torch.long, device=device)
        for b, p in enumerate(ids):
            tokens[b, : len(p)] = torch.tensor(p)
        lengths = torch.tensor([len(p) for p in ids], device=device)
        unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        positions = torch.arange(L, device=device).expand(unique.shape[0], L)
        if unique.shape[0] == B:
            return tokens, self.model.hidden_cached(tokens, positions[:B], cache.main), lengths
        shared = self.model.new_cache(unique.shape[0], L)
        h = self.model.hidden_cached(unique, positions, shared.main)  # right padding is never attended to
        cache.copy_rows(list(range(B)), shared, inverse.tolist())  # main layers (the caller fills an MTP cache)
        return tokens, h[inverse], lengths

    def _plain(self, ids, params: SamplingParams, gens: list[Generation], generators, on_token) -> None:
        B = len(ids)
        cache = self.model.new_cache(B, max(len(p) for p in ids) + params.max_new_tokens + 1)
        _, h, lengths = self._prefill(ids, cache)
        last = h[torch.arange(B), lengths - 1]  # (B, D)
        done = [False] * B
        for _ in range(params.max_new_tokens):
            probs = filtered_probs(self.model.head(last).float(), params)
            token = _draw(probs, generators)
            logp = probs.gather(1, token[:, None]).squeeze(1).clamp_min(1e-30).log()
            token_list, logp_list = token.tolist(), logp.tolist()
            for b in range(B):
                if not done[b]:
                    done[b] = self._emit(gens[b], b, token_list[b], logp_list[b], params, on_token)
            if all(done):
                return
            last = self.model.hidden_cached(token[:, None], lengths[:, None], cache.main)[:, 0]
            lengths = lengths + 1

    # ------------------------------------------------------------------ speculative decoding
    def _speculative(self, ids, params: SamplingParams, gens: list[Generation], generators, on_token,
                     stats: Stats) -> None:
        model, B = self.model, len(ids)
        max_len = max(len(p) for p in ids) + params.max_new_tokens + 3
        cache = model.new_cache(B, max_len, with_mtp=True)
        tokens, h, n = self._prefill(ids, cache)
        rows = torch.arange(B)
        history = torch.zeros(B, max_len, dtype=torch.long)  # every token, prompt and generated
        hidden = torch.zeros(B, max_len, model.cfg.dim, dtype=h.dtype)  # main hidden state at each position
        history[:, : tokens.shape[1]], hidden[:, : h.shape[1]] = tokens, h
        probs = filtered_probs(model.head(h[rows, n - 1]).float(), params)
        pending = _draw(probs, generators)  # token at position n, already part of the output
        done = [self._emit(gens[b], b, int(pending[b]), _logp(probs[b], pending[b]), params, on_token) for b in range(B)]
        history[rows, n] = pending
        mtp_cache = cache.mtp[0]
        if tokens.shape[1] > 1:  # MTP over the prompt: position i sees (h_i, t_{i+1})
            pos = torch.arange(tokens.shape[1] - 1).expand(B, -1)
            model.mtp_cached(1, h[:, :-1], tokens[:, 1:], pos, mtp_cache)
        while not all(done):
            # 1. draft t_{n+1} with MTP at positions n-2, n-1 (one of them may be recomputed: harmless)
            pos = torch.stack([(n - 2).clamp(min=0), n - 1], dim=1)
            h_mtp = model.mtp_cached(1, hidden[rows[:, None], pos], history[rows[:, None], pos + 1], pos, mtp_cache)
            q = filtered_probs(model.head(h_mtp[:, 1]).float(), params)
            draft = _draw(q, generators)
            # 2. verify: the main model on [pending, draft] at positions n, n+1
            pos = torch.stack([n, n + 1], dim=1)
            hv = model.hidden_cached(torch.stack([pending, draft], 1), pos, cache.main)
            p_all = filtered_probs(model.head(hv).float().flatten(0, 1), params).view(B, 2, -1)
            hidden[rows[:, None], pos] = hv
            n, pending = self._accept(rows, n, draft, q, p_all, generators, history, gens, done, params, on_token,
                                      stats)

    def _accept(self, rows, n, draft, q, p_all, generators, history, gens, done, params, on_token, stats):
        """Accept or reject each row's draft; returns the new (n, pending). Log-probs are the target's."""
        new_n, new_pending = n.clone(), torch.zeros_like(draft)
        for b in rows.tolist():
            if done[b]:
                continue
            p0, d = p_all[b, 0], int(draft[b])
            stats.drafted += 1
            accepted, residual = speculative_check(p0, q[b], d, generators[b])
            if accepted:
                stats.accepted += 1
                done[b] = self._emit(gens[b], b, d, _logp(p0, d), params, on_token)
                history[b, n[b] + 1] = d
                target, draw_from, new_n[b] = p_all[b, 1], p_all[b, 1], n[b] + 2  # the bonus token
            else:
                target, draw_from, new_n[b] = p0, residual, n[b] + 1
            if done[b]:
                continue
            token = _draw_one(draw_from, generators[b])
            new_pending[b] = token
            history[b, new_n[b]] = token
            done[b] = self._emit(gens[b], b, token, _logp(target, token), params, on_token)
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


def _logp(probs: torch.Tensor, token) -> float:
    return float(probs[int(token)].clamp_min(1e-30).log())
