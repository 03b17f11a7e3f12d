"""`nanoseek export --to gguf`: the file read back with llama.cpp's own Python package (gguf), and a forward pass
written from that file alone, the way llama.cpp's deepseek2 graph computes (absorbed MLA through attn_k_b /
attn_v_b, adjacent-pair RoPE, group-limited routing on exp_probs_b-corrected scores), equal to our model's."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import save_model
from nanoseek.cli import main
from nanoseek.gguf_export import unsupported
from nanoseek.template import r1_completion, r1_prompt
from nanoseek.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) reads the file back")

DOC = r1_prompt("What is 3 + 4?") + r1_completion("3 + 4 = 7.", "7")


def _random(seed: int, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", **kw))
    model.init_weights(0.05)  # large enough that a wrong transpose or split moves the logits visibly
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("gate.bias"):  # non-zero routing correction: exp_probs_b must matter
                buf.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = Tokenizer.train([DOC, "So the result is -14. First, 4 - 9 = -5."] * 20, 300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    t.save(path)
    return t, path


def _export(model, tok_path, root):
    save_model(model, root / "ckpt", tokenizer_file=tok_path)
    out = root / "m.gguf"
    assert main(["export", "--ckpt", str(root / "ckpt"), "--to", "gguf", str(out)]) == 0
    return gguf.GGUFReader(out)


def _field(reader, key):
    return reader.fields[key].contents()


def _rope(x, base):
    """llama.cpp's normal (non-NeoX) RoPE: adjacent pairs (2j, 2j+1) rotated by pos · base^(-2j/R)."""
    S, R = x.shape[0], x.shape[-1]
    inv = base ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv  # (S, R/2)
    cos, sin = ang.cos().float(), ang.sin().float()
    if x.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _moe(h, t, i, kv, arch):
    gate = kv(f"{arch}.expert_gating_func")
    logits = h @ t[f"blk.{i}.ffn_gate_inp.weight"].T
    probs = logits.sigmoid() if gate == 2 else logits.softmax(-1)
    sel = probs + t.get(f"blk.{i}.exp_probs_b.bias", torch.zeros(probs.shape[-1]))
    G, used = kv(f"{arch}.expert_group_count"), kv(f"{arch}.expert_group_used_count")
    if G > 1:
        groups = sel.view(sel.shape[0], G, -1)
        score = groups.topk(2, -1).values.sum(-1)  # a group's score: its two best experts
        keep = torch.zeros_like(score).scatter(1, score.topk(used, -1).indices, 1.0).bool()
        sel = groups.masked_fill(~keep[..., None], -math.inf).flatten(1)
    top = sel.topk(kv(f"{arch}.expert_used_count"), -1).indices
    w = probs.gather(1, top)
    if kv(f"{arch}.expert_weights_norm"):
        w = w / w.sum(-1, keepdim=True)
    w = w * kv(f"{arch}.expert_weights_scale")
    g, u, d = (t[f"blk.{i}.ffn_{n}_exps.weight"] for n in ("gate", "up", "down"))
    out = torch.zeros_like(h)
    for s in range(h.shape[0]):
        for k, e in enumerate(top[s].tolist()):
            out[s] += w[s, k] * (d[e] @ (F.silu(g[e] @ h[s]) * (u[e] @ h[s])))
    sh = [t[f"blk.{i}.ffn_{n}_shexp.weight"] for n in ("gate", "up", "down")]
    return out + (F.silu(h @ sh[0].T) * (h @ sh[1].T)) @ sh[2].T


def _attention(h, t, i, kv, arch):
    H, C, R = kv(f"{arch}.attention.head_count"), kv(f"{arch}.attention.kv_lora_rank"), kv(f"{arch}.rope.dimension_count")
    eps, base = kv(f"{arch}.attention.layer_norm_rms_epsilon"), kv(f"{arch}.rope.freq_base")
    S = h.shape[0]
    if f"blk.{i}.attn_q.weight" in t:  # no query LoRA
        q = h @ t[f"blk.{i}.attn_q.weight"].T
    else:
        q = _rms(h @ t[f"blk.{i}.attn_q_a.weight"].T, t[f"blk.{i}.attn_q_a_norm.weight"], eps) @ t[
            f"blk.{i}.attn_q_b.weight"].T
    q = q.view(S, H, -1)
    P = q.shape[-1] - R
    q_nope, q_pe = q[..., :P], _rope(q[..., P:], base)
    kv_a = h @ t[f"blk.{i}.attn_kv_a_mqa.weight"].T
    c = _rms(kv_a[:, :C], t[f"blk.{i}.attn_kv_a_norm.weight"], eps)  # the cached latent
    k_pe = _rope(kv_a[:, C:], base)
    q_lat = torch.einsum("shp,hcp->shc", q_nope, t[f"blk.{i}.attn_k_b.weight"])  # W^{UK} absorbed into the query
    scores = (torch.einsum("shc,tc->hst", q_lat, c) + torch.einsum("shr,tr->hst", q_pe, k_pe)) / math.sqrt(
        kv(f"{arch}.attention.key_length_mla"))
    scores = scores.masked_fill(torch.ones(S, S).triu(1).bool(), -math.inf)
    o = torch.einsum("hst,tc->shc", scores.softmax(-1), c)
    o = torch.einsum("shc,hvc->shv", o, t[f"blk.{i}.attn_v_b.weight"]).reshape(S, -1)
    return o @ t[f"blk.{i}.attn_output.weight"].T


def gguf_forward(reader, ids):
    """Logits from the GGUF file alone, as llama.cpp's deepseek2 graph computes them."""
    t = {x.name: torch.from_numpy(x.data.copy()).float() for x in reader.tensors}
    arch = _field(reader, "general.architecture")

    def kv(key):
        return _field(reader, key)

    eps = kv(f"{arch}.attention.layer_norm_rms_epsilon")
    x = t["token_embd.weight"][ids]
    for i in range(kv(f"{arch}.block_count")):
        x = x + _attention(_rms(x, t[f"blk.{i}.attn_norm.weight"], eps), t, i, kv, arch)
        h = _rms(x, t[f"blk.{i}.ffn_norm.weight"], eps)
        if i < kv(f"{arch}.leading_dense_block_count"):
            x = x + (F.silu(h @ t[f"blk.{i}.ffn_gate.weight"].T) * (h @ t[f"blk.{i}.ffn_up.weight"].T)) @ t[
                f"blk.{i}.ffn_down.weight"].T
        else:
            x = x + _moe(h, t, i, kv, arch)
    return _rms(x, t["output_norm.weight"], eps) @ t["output.weight"].T


@pytest.mark.parametrize("kw", [dict(), dict(score_func="softmax", n_expert_groups=1, n_limited_groups=1,
                                             route_scale=1.0, route_norm=False, q_lora_rank=0)],
                         ids=["v3-sigmoid-groups", "v2-softmax-no-q-lora"])
def test_gguf_forward_equals_ours(tok, tmp_path, kw):
    t, path = tok
    model = _random(1, vocab_size=t.vocab_size, **kw)
    reader = _export(model, path, tmp_path)
    ids = torch.tensor(t.encode(DOC)[:40])
    with torch.no_grad():
        ours = model(ids[None])[0]
    theirs = gguf_forward(reader, ids)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_gguf_metadata_and_tokenizer(tok, tmp_path):
    t, path = tok
    model = _random(2, vocab_size=t.vocab_size)
    reader = _export(model, path, tmp_path)
    cfg = model.cfg
    assert _field(reader, "general.architecture") == "deepseek2"
    a = "deepseek2"
    assert _field(reader, f"{a}.block_count") == cfg.n_layers  # the MTP module is not written
    assert not any(x.name.startswith(f"blk.{cfg.n_layers}.") for x in reader.tensors)
    assert (_field(reader, f"{a}.attention.kv_lora_rank"), _field(reader, f"{a}.attention.key_length"),
            _field(reader, f"{a}.attention.value_length")) == (cfg.kv_lora_rank, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                                               cfg.kv_lora_rank)
    assert _field(reader, f"{a}.expert_gating_func") == 2 and _field(reader, f"{a}.expert_group_count") == 4
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = t.tk.get_vocab(with_added_tokens=True)
    assert all(tokens[i] == s for s, i in vocab.items())
    types = _field(reader, "tokenizer.ggml.token_type")
    special = {t.bos_id, t.eos_id, t.pad_id}
    assert all(types[i] == (gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in special | {
        vocab["7"], vocab["Ġ="]})
    assert all(types[i] == gguf.TokenType.UNUSED for i in range(len(vocab), cfg.vocab_size))
    merges = json.loads(path.read_text())["model"]["merges"]
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(merges)
    assert (_field(reader, "tokenizer.ggml.eos_token_id"), _field(reader, "tokenizer.ggml.bos_token_id")) == (
        t.eos_id, t.bos_id)
    assert "Assistant" in _field(reader, "tokenizer.chat_template")


def test_gguf_refusals_and_overwrite(tok, tmp_path):
    _, path = tok
    assert "v32" in unsupported(get_preset("tiny-v32"))
    assert "best expert" in unsupported(get_preset("tiny", score_func="softmax", route_norm=False))
    model = _random(3)
    save_model(model, tmp_path / "ckpt", tokenizer_file=path)
    out = tmp_path / "m.gguf"
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--to", "gguf", str(out)]) == 0
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--to", "gguf", str(out)]) == 2  # never replaced silently
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--to", "gguf", str(out), "--force"]) == 0
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--to", "gguf", str(foreign), "--force"]) == 2
    assert foreign.read_text() == "mine"
