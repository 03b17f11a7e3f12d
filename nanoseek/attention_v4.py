"""DeepSeek-V4 attention: shared-KV MQA over a sliding window plus compressed memory (V4 report §2.3).

Every layer projects one key/value head kv_t (K = V, RMSNorm'd, RoPE on its last R dims) and H queries
(a low-rank query latent c^Q, per-head unweighted RMSNorm). A query at position t attends to
- the raw entries of the last `window_size` positions (itself included), and, by layer kind,
- HCA: every compressed entry whose window of m' tokens has ended by t (m' = 128 in V4), or
- CSA: the top-k compressed entries (windows of m = 4, overlapping: width 2m, stride m) ranked by a lightning
  indexer that runs its own small compressor (§2.3.1, eqs. 9-17),
plus one learned per-head sink logit that takes probability mass without contributing a value. Entry w pools
its tokens j with softmax_j(Z_j + B_j) ⊙ C_j (C = W^{KV} h, Z = W^Z h, B a learned per-slot bias) and is
rotated at position w·m. Because K = V carries RoPE, the output's rope dims are rotated back by -t. The heads
then go through the grouped low-rank output projection: g groups, each to d_g dims, then one mix to D.

Paths: `naive` is the reference (every query against every key under masks); the default blocked path reads
for each block of queries only its window and the compressed entries it may see; cached decoding (the
`*_cached` methods, see V4LayerCache) keeps ring buffers of the window and of the compressor inputs plus the
compressed entries, and gathers the k selected CSA entries per query. All are tested against each other and,
through the model, logit-exact against transformers' DeepseekV4ForCausalLM.
Dimension letters as in model.py, plus W window, M compression rate, N compressed entries, J indexer heads,
I indexer head dim, G output groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .model import RMSNorm, apply_rotary_emb
from .sparse import index_scores, topk_indices


def rotate_tail(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved RoPE on the last 2·freqs.shape[-1] dims of x (B, T, H, d); inverse rotates by -θ."""
    R = 2 * freqs_cis.shape[-1]
    rotated = apply_rotary_emb(x[..., -R:], freqs_cis.conj() if inverse else freqs_cis)
    return torch.cat([x[..., :-R], rotated], dim=-1)


def attend_with_sinks(q: torch.Tensor, keys: list[torch.Tensor], masks: list[torch.Tensor], sink: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """softmax([q·k_s · scale]_s ∪ {sink_h}) · v over several key sets (K = V), each with its own mask.

    q (B, T, H, d). A key set is (B, S, d) shared by the queries (mask (B, T, S)) or (B, T, S, d) per query
    (mask (B, T, S)). The sink logit joins the softmax and is then dropped. Returns (B, T, H, d)."""
    logits = []
    for k, m in zip(keys, masks):
        eq = "bthd,bsd->bths" if k.dim() == 3 else "bthd,btsd->bths"
        logits.append(torch.einsum(eq, q, k).mul(scale).masked_fill(~m[:, :, None], float("-inf")))
    B, T, H, _ = q.shape
    logits.append(sink.float().view(1, 1, H, 1).expand(B, T, H, 1).to(q.dtype))
    probs = torch.cat(logits, dim=-1).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    out, s0 = 0, 0
    for k in keys:
        p = probs[..., s0:s0 + k.shape[-2]]
        out = out + torch.einsum("bths,bsd->bthd" if k.dim() == 3 else "bths,btsd->bthd", p, k)
        s0 += k.shape[-2]
    return out


class GroupedLinear(nn.Module):
    """Block-diagonal projection: each of `groups` slices of the input (d_in each) to its own d_out outputs.

    weight (groups·d_out, d_in), rows of group g contiguous, as DeepSeek stores `wo_a`."""

    def __init__(self, d_in: int, d_out: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups * d_out, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., G, d_in) -> (..., G, d_out)."""
        w = self.weight.view(self.groups, -1, self.weight.shape[-1])  # (G, d_out, d_in)
        return torch.einsum("...gi,goi->...go", x, w)


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one entry of `head_dim` (V4 §2.3.1 eqs. 9-12, §2.3.2 eqs. 20-23).

    Without overlap (HCA) entry w pools its own window. With overlap (CSA) wkv/wgate give two series per token,
    C^a (first half) and C^b (second half), and entry w pools window w-1's C^a and window w's C^b together:
    2·ratio slots, softmax over slots per channel. `ape` is the learned per-slot bias B."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, overlap
        width = 2 * head_dim if overlap else head_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(head_dim, eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.wkv(x), self.wgate(x)  # (B, T, c) each: C and Z

    def assemble(self, kv: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw C, Z of one entry's positions (..., M or 2M, c) -> its pooling slots (..., S, head_dim), bias added.

        With overlap the 2M positions are windows w-1 and w: C^a of the first, C^b of the second."""
        if not self.overlap:
            return kv, gate + self.ape
        M, d = self.ratio, self.head_dim
        gate = gate + torch.cat([self.ape, self.ape])  # each position's slot bias, both windows
        return (torch.cat([kv[..., :M, :d], kv[..., M:, d:]], dim=-2),
                torch.cat([gate[..., :M, :d], gate[..., M:, d:]], dim=-2))

    def pool(self, kv_slots: torch.Tensor, gate_slots: torch.Tensor) -> torch.Tensor:
        """Norm(Σ_slots softmax(gate) ⊙ kv), softmax in fp32. (..., S, head_dim) -> (..., head_dim), unrotated."""
        weights = gate_slots.softmax(dim=-2, dtype=torch.float32).to(kv_slots.dtype)
        return self.norm((kv_slots * weights).sum(dim=-2))

    def entries(self, x: torch.Tensor) -> torch.Tensor:
        """Every complete window of a full sequence: x (B, T, D) -> (B, T // M, head_dim), unrotated.

        Window 0 has no predecessor: its C^a slots are empty (zero C, -inf Z)."""
        B, T, _ = x.shape
        n, M = T // self.ratio, self.ratio
        kv, gate = self.project(x[:, : n * M])
        if n == 0:
            return kv.new_zeros(B, 0, self.head_dim)
        kv, gate = kv.view(B, n, M, -1), gate.view(B, n, M, -1)  # (B, N, M, c)
        if self.overlap:
            kv = torch.cat([F.pad(kv[:, :-1], (0, 0, 0, 0, 1, 0)), kv], dim=2)  # (B, N, 2M, c)
            gate = torch.cat([F.pad(gate[:, :-1], (0, 0, 0, 0, 1, 0), value=float("-inf")), gate], dim=2)
        return self.pool(*self.assemble(kv, gate))


class IndexerV4(nn.Module):
    """CSA's lightning indexer: J heads of dim I score the compressed keys of its own compressor (V4 eqs. 13-17)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        J, I = cfg.index_n_heads, cfg.index_head_dim
        self.n_heads, self.head_dim, self.topk = J, I, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, J * I, bias=False)
        self.weights_proj = nn.Linear(cfg.dim, J, bias=False)
        self.compressor = Compressor(cfg.dim, I, cfg.csa_ratio, overlap=True, eps=cfg.norm_eps)

    def queries(self, x: torch.Tensor, q_res: torch.Tensor, freqs: torch.Tensor):
        """x (B, T, D), q_res (B, T, Q) -> rotated queries (B, T, J, I) and fp32 head weights (B, T, J)."""
        B, T, _ = x.shape
        q = rotate_tail(self.wq_b(q_res).view(B, T, self.n_heads, self.head_dim), freqs)
        return q, self.weights_proj(x).float() * self.n_heads**-0.5

    def scores(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Σ_j w_{t,j} · ReLU(q_{t,j} · K_s) / √I in fp32. q (B, T, J, I), w (B, T, J), keys (B, N, I) -> (B, T, N)."""
        return index_scores(q, w, keys, self.head_dim**-0.5)


class AttentionV4(nn.Module):
    """One V4 attention layer of kind 'sliding', 'csa' or 'hca' (module names as in DeepSeek's checkpoints)."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        H, hd, D, G = cfg.n_heads, cfg.head_dim, cfg.dim, cfg.o_groups
        self.kind, self.n_heads, self.head_dim, self.window = kind, H, hd, cfg.window_size
        self.scale, self.eps, self.attn_impl = cfg.softmax_scale, cfg.norm_eps, cfg.attn_impl
        self.ratio = 0 if kind == "sliding" else cfg.csa_ratio if kind == "csa" else self._hca_ratio(cfg)
        self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * hd, bias=False)
        self.wkv = nn.Linear(D, hd, bias=False)
        self.kv_norm = RMSNorm(hd, cfg.norm_eps)
        self.wo_a = GroupedLinear(H * hd // G, cfg.o_lora_rank, G)
        self.wo_b = nn.Linear(G * cfg.o_lora_rank, D, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H))
        if kind != "sliding":
            self.compressor = Compressor(D, hd, self.ratio, overlap=kind == "csa", eps=cfg.norm_eps)
        if kind == "csa":
            self.indexer = IndexerV4(cfg)

    @staticmethod
    def _hca_ratio(cfg: ModelConfig) -> int:
        return next(r for r in cfg.compress_ratios if r and r != cfg.csa_ratio)

    def project(self, x: torch.Tensor, freqs: torch.Tensor):
        """x (B, T, D) -> query latent (B, T, Q), rotated queries (B, T, H, hd), rotated shared K=V (B, T, hd)."""
        B, T, _ = x.shape
        q_res = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_res).view(B, T, self.n_heads, self.head_dim)
        q = rotate_tail(F.rms_norm(q.float(), (self.head_dim,), eps=self.eps).to(q.dtype), freqs)
        kv = rotate_tail(self.kv_norm(self.wkv(x)).unsqueeze(2), freqs).squeeze(2)
        return q_res, q, kv

    def output(self, o: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Undo RoPE on the output's rope dims (K = V carried it), then the grouped projection. -> (B, T, D)"""
        B, T = o.shape[:2]
        o = rotate_tail(o, freqs, inverse=True).reshape(B, T, self.wo_a.groups, -1)  # (B, T, G, H·hd/G)
        return self.wo_b(self.wo_a(o).flatten(2))

    def forward(self, x: torch.Tensor, table: torch.Tensor, cache=None, positions: torch.Tensor | None = None,
                attn_impl: str | None = None) -> torch.Tensor:
        """x (B, T, D); table: this layer's complex RoPE table (max_seq_len, R/2). With a cache (V4LayerCache),
        the tokens sit at `positions` (B, T) and the cache is read and extended; without, T is a full sequence."""
        if cache is not None:
            return self.forward_cached(x, table, cache, positions)
        B, T, _ = x.shape
        freqs = table[:T]
        q_res, q, kv = self.project(x, freqs)
        comp, comp_visible = self.compressed(x, q_res, table)  # (B, N, hd), (B, T, N)
        t = torch.arange(T, device=x.device)
        if (attn_impl or self.attn_impl) == "naive":
            window = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - self.window)  # (T, S)
            o = attend_with_sinks(q, [kv, comp], [window.expand(B, T, T), comp_visible], self.attn_sink, self.scale)
        else:
            o = self.attend_blocked(q, kv, comp, comp_visible)
        return self.output(o, freqs)

    def compressed(self, x: torch.Tensor, q_res: torch.Tensor, table: torch.Tensor):
        """Full sequence: the compressed entries (B, N, hd), rotated at w·M, and which of them each query sees
        (B, T, N): the ended windows (HCA), or the indexer's top-k of them (CSA)."""
        B, T, _ = x.shape
        if self.kind == "sliding":
            return x.new_zeros(B, 0, self.head_dim), torch.zeros(B, T, 0, dtype=torch.bool, device=x.device)
        comp = self.compressor.entries(x)
        N = comp.shape[1]
        if N == 0:  # a sequence shorter than one window: nothing compressed yet
            return comp, torch.zeros(B, T, 0, dtype=torch.bool, device=x.device)
        starts = torch.arange(N, device=x.device) * self.ratio
        comp = rotate_tail(comp.unsqueeze(2), table[starts]).squeeze(2)
        ended = torch.arange(N, device=x.device) < (torch.arange(T, device=x.device)[:, None] + 1) // self.ratio
        ended = ended.expand(B, T, N)
        if self.kind == "hca" or N == 0:
            return comp, ended
        keys = rotate_tail(self.indexer.compressor.entries(x).unsqueeze(2), table[starts]).squeeze(2)
        q_i, w_i = self.indexer.queries(x, q_res, table[:T])
        scores = self.indexer.scores(q_i, w_i, keys).masked_fill(~ended, float("-inf"))
        top = topk_indices(scores, min(self.indexer.topk, N))
        return comp, ended & torch.zeros_like(ended).scatter_(-1, top, True)

    def attend_blocked(self, q, kv, comp, comp_visible, block: int | None = None) -> torch.Tensor:
        """Query blocks against their window's keys and the compressed entries they may see. -> (B, T, H, hd)"""
        B, T = q.shape[:2]
        block = block or max(self.window, 16)
        outs = []
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            s0 = max(0, t0 - self.window + 1)
            tq, tk = torch.arange(t0, t1, device=q.device), torch.arange(s0, t1, device=q.device)
            window = (tk[None, :] <= tq[:, None]) & (tk[None, :] > tq[:, None] - self.window)
            n = (t1 // self.ratio) if self.ratio else 0  # entries ended by the block's last query
            outs.append(attend_with_sinks(q[:, t0:t1], [kv[:, s0:t1], comp[:, :n]],
                                          [window.expand(B, -1, -1), comp_visible[:, t0:t1, :n]],
                                          self.attn_sink, self.scale))
        return torch.cat(outs, dim=1)

    # ------------------------------------------------------------------ cached decoding

    def forward_cached(self, x: torch.Tensor, table: torch.Tensor, cache, positions: torch.Tensor) -> torch.Tensor:
        """Tokens at `positions` (B, T), consecutive in each row from that row's current length p0 (positions
        below p0 are the row's history; writing at p0 forgets everything from p0 on)."""
        B, T, _ = x.shape
        p0 = positions[:, 0]
        if not torch.equal(positions, p0[:, None] + torch.arange(T, device=x.device)):
            raise ValueError("V4 cached decoding needs consecutive positions in each row (p0, p0+1, ...)")
        freqs = table[positions]  # (B, T, R/2)
        q_res, q, kv = self.project(x, freqs)
        keys, masks = cache.window_keys(kv, positions, self.window)
        if self.kind != "sliding":
            comp = cache.compress("kv", self.compressor, x, positions, table)  # (B, N_max, hd)
            ended = torch.arange(comp.shape[1], device=x.device) < (positions[..., None] + 1) // self.ratio
            n = int(ended.sum(-1).max())
            if self.kind == "hca" or n == 0:
                keys, masks = keys + [comp[:, :n]], masks + [ended[..., :n]]
            else:
                ikeys = cache.compress("index", self.indexer.compressor, x, positions, table)[:, :n]
                q_i, w_i = self.indexer.queries(x, q_res, freqs)
                scores = self.indexer.scores(q_i, w_i, ikeys).masked_fill(~ended[..., :n], float("-inf"))
                top = topk_indices(scores, min(self.indexer.topk, n))  # (B, T, k)
                rows = torch.arange(B, device=x.device)[:, None, None]
                keys, masks = keys + [comp[rows, top]], masks + [ended.gather(-1, top)]
        o = attend_with_sinks(q, keys, masks, self.attn_sink, self.scale)
        cache.write_window(kv, positions)
        return self.output(o, freqs)


# ----------------------------------------------------------------------------- caches


class Ring:
    """Per-row ring buffer of per-position vectors, each slot tagged with the position it holds (-1: none)."""

    def __init__(self, batch: int, capacity: int, width: int, like: dict):
        self.data = torch.zeros(batch, capacity, width, **like)
        self.tag = torch.full((batch, capacity), -1, dtype=torch.long, device=like["device"])

    def read(self, rows: torch.Tensor, pos: torch.Tensor, p0: torch.Tensor, chunk: torch.Tensor):
        """Values at absolute positions pos (K, S) of rows `rows` (K,): from `chunk` (K, T, w) (positions p0 (K,)
        onwards, being written now) or from the ring. Returns values (K, S, w) and whether each was present."""
        cap, T = self.data.shape[1], chunk.shape[1]
        slot = pos.remainder(cap)
        old, old_ok = self.data[rows[:, None], slot], self.tag[rows[:, None], slot] == pos
        fresh = pos >= p0[:, None]
        new = chunk[torch.arange(len(rows), device=pos.device)[:, None], (pos - p0[:, None]).clamp(0, T - 1)]
        return torch.where(fresh[..., None], new, old), fresh | old_ok

    def rows(self, start: int, stop: int) -> "Ring":
        """Rows start..stop-1, sharing this ring's storage."""
        view = Ring.__new__(Ring)
        view.data, view.tag = self.data[start:stop], self.tag[start:stop]
        return view

    def copy_rows(self, dst, src: "Ring", src_rows) -> None:
        self.data[dst], self.tag[dst] = src.data[src_rows], src.tag[src_rows]

    def write(self, values: torch.Tensor, positions: torch.Tensor) -> None:
        """values (B, T, w) at positions (B, T); of a chunk longer than the ring only its tail stays."""
        cap = self.data.shape[1]
        values, positions = values[:, -cap:], positions[:, -cap:]
        rows = torch.arange(values.shape[0], device=values.device)[:, None]
        self.data[rows, positions.remainder(cap)] = values.to(self.data.dtype)
        self.tag[rows, positions.remainder(cap)] = positions


def _missing(what: str) -> ValueError:
    return ValueError(f"V4 cache: the {what} a query needs was overwritten; a row may go back at most `rewind` "
                      "positions (new_cache(..., rewind=N)), or restart at position 0 as a new sequence")


class V4LayerCache:
    """One V4 layer's decoding state for `batch` rows (slots): what the layer's attention reads, no more.

    - window: ring of the last window_size + rewind rotated K=V entries (the sliding-window branch);
    - per compressor ('kv', and 'index' in CSA layers): a ring of its inputs C, Z for the last 2M (CSA) or M
      (HCA) positions + rewind, i.e. the windows still open, and every compressed entry so far, by window index.
    Everything is keyed by absolute position, so a row decodes at its own position, may rewind up to `rewind`
    positions (a rejected speculative draft, say), and is reused by a new sequence by writing from position 0.
    Reading anything that was already overwritten raises ValueError instead of returning a wrong result."""

    def __init__(self, cfg: ModelConfig, attn: AttentionV4, batch: int, max_len: int, rewind: int, like: dict):
        self.window = Ring(batch, cfg.window_size + rewind, cfg.head_dim, like)
        self.comp: dict[str, tuple[Ring, torch.Tensor]] = {}
        if attn.kind != "sliding":
            span = (2 if attn.kind == "csa" else 1) * attn.ratio + rewind
            n_max = max_len // attn.ratio
            self.comp["kv"] = (Ring(batch, span, 2 * attn.compressor.wkv.out_features, like),
                               torch.zeros(batch, n_max, cfg.head_dim, **like))
            if attn.kind == "csa":
                self.comp["index"] = (Ring(batch, span, 2 * attn.indexer.compressor.wkv.out_features, like),
                                      torch.zeros(batch, n_max, cfg.index_head_dim, **like))

    def rows(self, start: int, stop: int) -> "V4LayerCache":
        """Rows start..stop-1, sharing this cache's storage."""
        view = V4LayerCache.__new__(V4LayerCache)
        view.window = self.window.rows(start, stop)
        view.comp = {k: (ring.rows(start, stop), entries[start:stop]) for k, (ring, entries) in self.comp.items()}
        return view

    def copy_rows(self, dst, src: "V4LayerCache", src_rows) -> None:
        """self[dst] = src[src_rows]; src may hold fewer positions (its compressed entries are copied as far as
        they go)."""
        self.window.copy_rows(dst, src.window, src_rows)
        for k, (ring, entries) in self.comp.items():
            src_ring, src_entries = src.comp[k]
            ring.copy_rows(dst, src_ring, src_rows)
            n = src_entries.shape[1]
            entries[dst, :n] = src_entries[src_rows]

    def nbytes(self) -> int:
        tensors = [self.window.data] + [t for ring, entries in self.comp.values() for t in (ring.data, entries)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def window_keys(self, kv: torch.Tensor, positions: torch.Tensor, W: int):
        """Keys (the ring, then this chunk's kv (B, T, hd)) and masks for queries at positions (B, T)."""
        p0 = positions[:, 0]
        need = p0[:, None] - 1 - torch.arange(W - 1, device=kv.device)  # history the first query needs
        ring = self.window
        held = ring.tag.gather(1, need.clamp(min=0).remainder(ring.tag.shape[1])) == need
        if not bool((held | (need < 0)).all()):
            raise _missing("sliding-window key")
        t, tag = positions[..., None], ring.tag[:, None, :]  # (B, T, 1), (B, 1, cap)
        old = (tag >= 0) & (tag < p0[:, None, None]) & (tag > t - W)
        new = (positions[:, None, :] <= t) & (positions[:, None, :] > t - W)  # (B, T, T)
        return [ring.data, kv], [old, new]

    def write_window(self, kv: torch.Tensor, positions: torch.Tensor) -> None:
        self.window.write(kv, positions)

    def compress(self, name: str, compressor: Compressor, x: torch.Tensor, positions: torch.Tensor,
                 table: torch.Tensor) -> torch.Tensor:
        """Project this chunk, emit the entries of the windows it completes, remember the open windows' inputs.
        Returns every compressed entry of the rows so far (B, N_max, d), rotated at w·M."""
        ring, entries = self.comp[name]
        kv, gate = compressor.project(x)  # (B, T, c) each
        chunk = torch.cat([kv, gate], dim=-1)
        M, c = compressor.ratio, kv.shape[-1]
        bi, ti = torch.nonzero((positions + 1) % M == 0, as_tuple=True)  # queries that close a window
        if bi.numel():
            w = (positions[bi, ti] + 1) // M - 1  # (K,) the windows they close
            span = 2 * M if compressor.overlap else M
            pos = ((w + 1) * M - span)[:, None] + torch.arange(span, device=x.device)  # (K, span) its positions
            vals, held = ring.read(bi, pos, positions[bi, 0], chunk[bi])
            if not bool((held | (pos < 0)).all()):
                raise _missing(f"{name} compressor input")
            kv_s, gate_s = vals.split(c, dim=-1)
            gate_s = gate_s.masked_fill((pos < 0)[..., None], float("-inf"))  # before the first window: empty
            new = compressor.pool(*compressor.assemble(kv_s, gate_s))  # (K, d)
            entries[bi, w] = rotate_tail(new[:, None, None], table[w * M][:, None]).reshape(new.shape).to(entries.dtype)
        ring.write(chunk, positions)
        return entries


class V4Cache:
    """The per-layer caches of a V4 model (main layers, then MTP layers with with_mtp); `.main` feeds
    `hidden_cached`, `.mtp[k]` feeds `mtp_cached(k + 1, ...)`."""

    def __init__(self, model, batch: int, max_len: int, with_mtp: bool = False, rewind: int = 16):
        like = dict(dtype=model.head.weight.dtype, device=model.head.weight.device)  # compute dtype
        blocks = list(model.layers) + (list(model.mtp) if with_mtp else [])
        self.layers = [V4LayerCache(model.cfg, b.attn, batch, max_len, rewind, like) for b in blocks]
        self.n_main, self.max_len = len(model.layers), max_len

    @property
    def main(self) -> list[V4LayerCache]:
        return self.layers[: self.n_main]

    def rows(self, start: int, stop: int) -> "V4Cache":
        """Rows start..stop-1 of every layer, sharing this cache's storage (what the engine's batcher slices)."""
        view = V4Cache.__new__(V4Cache)
        view.layers = [layer.rows(start, stop) for layer in self.layers]
        view.n_main, view.max_len = self.n_main, self.max_len
        return view

    def copy_rows(self, dst, src: "V4Cache", src_rows) -> None:
        """self[dst] = src[src_rows] for the layers src holds (dst, src_rows: index lists)."""
        for mine, theirs in zip(self.layers, src.layers):
            mine.copy_rows(dst, theirs, src_rows)

    @property
    def mtp(self) -> list[V4LayerCache]:
        return self.layers[self.n_main:]

    def nbytes(self) -> int:
        """Bytes the main layers' caches occupy (all rows)."""
        return sum(layer.nbytes() for layer in self.main)
