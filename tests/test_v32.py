"""DeepSeek-V3.2 (sparse attention): logit parity with transformers both ways, the attention paths against each
other, cached decoding against the full forward, the indexer's training signal, FP8 export."""

import random

import pytest
import torch

from nanoseek import Transformer, build_model, get_preset
from nanoseek.hf import config_from_hf, config_to_hf, load_hf, save_hf
from nanoseek.sparse import IndexerLog, TransformerV32, topk_indices
from tests.hf_configs import build_hf_config, random_v32_config
from tests.test_hf_parity import TOL, randomize_extras, rel_err, tokens_for

transformers = pytest.importorskip("transformers")

V32_NAMED = dict(  # V3 routing and YaRN past 16 tokens; 8 indexer heads keep the top-6 of 40 keys
    model_type="deepseek_v32", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
    num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, index_n_heads=8, index_head_dim=16, index_topk=6, max_position_embeddings=64,
    initializer_range=0.1,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1},
)


def hf_v32(d: dict, seed: int):
    torch.manual_seed(seed)
    model = transformers.DeepseekV32ForCausalLM(build_hf_config(d)).eval()
    randomize_extras(model, seed)
    return model


def check_hf_to_ours(d: dict, seed: int, tmp_path) -> None:
    theirs = hf_v32(d, seed)
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert isinstance(ours, TransformerV32) and ours.cfg.index_topk < 40
    tokens = tokens_for(d["vocab_size"], seed)
    with torch.no_grad():
        ref = theirs(tokens).logits
        for impl in ("naive", "absorb"):
            other = build_model(ours.cfg.replace(attn_impl=impl)).eval()
            other.load_state_dict(ours.state_dict())
            assert rel_err(other(tokens), ref) <= TOL, impl


def check_ours_to_hf(d: dict, seed: int, tmp_path) -> None:
    cfg = config_from_hf(d)
    torch.manual_seed(seed)
    ours = build_model(cfg.replace(n_mtp_layers=1)).eval()
    ours.init_weights(std=0.1)
    randomize_extras(ours, seed)
    save_hf(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "DeepseekV32ForCausalLM"
    tokens = tokens_for(cfg.vocab_size, seed)
    with torch.no_grad():
        assert rel_err(ours(tokens), theirs(tokens).logits) <= TOL


def test_named_config_both_ways(tmp_path):
    check_hf_to_ours(V32_NAMED, seed=7, tmp_path=tmp_path / "a")
    check_ours_to_hf(V32_NAMED, seed=7, tmp_path=tmp_path / "b")


@pytest.mark.parametrize("case", range(4))
def test_random_configs_both_ways(case, tmp_path):
    check_hf_to_ours(random_v32_config(random.Random(3000 + case)), seed=case, tmp_path=tmp_path / "a")
    check_ours_to_hf(random_v32_config(random.Random(3100 + case)), seed=case, tmp_path=tmp_path / "b")


def test_config_roundtrip_and_preset():
    cfg = get_preset("deepseek-v3.2")
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.family) == (64, 128, 2048, "v32")
    d = config_to_hf(cfg)
    assert d["model_type"] == "deepseek_v32" and "rope_interleave" not in d
    assert config_from_hf(d) == cfg.replace(route_norm=True)
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, TransformerV32) and model.layers[5].attn.indexer.wq_b.weight.shape == (64 * 128, 1536)


def tiny_v32(seed: int = 0, **kw) -> TransformerV32:
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny-v32", max_seq_len=96, **kw)).eval()
    model.init_weights(std=0.1)
    randomize_extras(model, seed)
    return model


def test_topk_ties_go_to_the_earlier_key():
    scores = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0]])
    assert topk_indices(scores, 3).tolist() == [[1, 4, 0]]


def test_selection_is_sparse_and_paths_agree():
    """Queries past index_topk see exactly index_topk keys; naive, latent and gathered attention agree."""
    model = tiny_v32()
    attn = model.layers[1].attn
    x = torch.randn(2, 30, model.cfg.dim)
    freqs = torch.view_as_complex(model.freqs_cis[:30])
    with torch.no_grad():
        out = {impl: attn(x, freqs, attn_impl=impl) for impl in ("naive", "absorb")}
        cache = model.new_cache(2, 30).main[1]
        gathered = attn(x, freqs, cache, torch.arange(30).expand(2, 30))
    assert rel_err(out["absorb"], out["naive"]) < 1e-5 and rel_err(gathered, out["naive"]) < 1e-5
    dense = build_model(get_preset("tiny-v32", max_seq_len=96, index_topk=96))
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(dense.layers[1].attn(x, freqs), out["naive"]) > 1e-3  # selection changed the output


def test_cached_decode_equals_full_forward_and_slots_are_reusable():
    model = tiny_v32()
    B, L, steps = 2, 7, 16
    tokens = torch.randint(0, 256, (B, L + steps), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(B, L + steps)
    with torch.no_grad():
        full = model(tokens)
        h = model.hidden_cached(tokens[:, :L], torch.arange(L).expand(B, L), cache.main)
        assert rel_err(model.head(h), full[:, :L]) < 1e-5
        for t in range(L, L + steps):
            h = model.hidden_cached(tokens[:, t:t + 1], torch.full((B, 1), t), cache.main, attn_impl="absorb")
            assert rel_err(model.head(h[:, 0]), full[:, t]) < 1e-5, t
        other = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
        rows = torch.arange(1)
        reuse = model.new_cache(B, L + steps)
        reuse.kv.copy_(cache.kv)  # row 0 keeps the old sequence's entries past position 11
        reuse.pe.copy_(cache.pe)
        reuse.index_k.copy_(cache.index_k)
        h = model.hidden_cached(other, torch.arange(12)[None], [c._replace(kv=c.kv[rows], pe=c.pe[rows],
                                                                         index_k=c.index_k[rows]) for c in reuse.main])
        assert rel_err(model.head(h), model(other)) < 1e-5


def test_indexer_learns_from_its_kl_only():
    """The LM loss never reaches the indexer; the KL reaches only the indexer; dense warm-up = V3's attention."""
    model = tiny_v32().train()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    log = IndexerLog(dense=False)
    model(tokens, router_log=log).float().pow(2).mean().backward()
    indexer = {n for n, _ in model.named_parameters() if ".indexer." in n}
    assert all(p.grad is None or p.grad.abs().max() == 0 for n, p in model.named_parameters() if n in indexer)
    model.zero_grad()
    assert len(log.indexer_losses) == model.cfg.n_layers and all(kl >= 0 for kl in log.indexer_losses)
    torch.stack(log.indexer_losses).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert grads and grads <= indexer
    dense_log = IndexerLog(dense=True)
    v3 = build_model(get_preset("tiny", max_seq_len=96))
    v3.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    with torch.no_grad():
        assert rel_err(model(tokens, router_log=dense_log), v3(tokens)) < 1e-5


def test_indexer_kl_decreases_when_trained():
    model = tiny_v32().train()
    params = [p for n, p in model.named_parameters() if ".indexer." in n]
    opt = torch.optim.Adam(params, lr=3e-3)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(15):
        log = IndexerLog(dense=True)
        model(tokens, router_log=log)
        loss = torch.stack(log.indexer_losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_fp8_export_keeps_indexer_weights_in_bf16(tmp_path):
    """V3.2 ships the indexer's query/key projections in FP8 and its head weights in bf16 (like the routers)."""
    model = tiny_v32(dim=160)
    save_hf(model, tmp_path, fp8=True)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.1.self_attn.indexer.wq_b.weight"
    assert state[key].dtype == torch.float8_e4m3fn and key.replace("weight", "weight_scale_inv") in state
    assert state["model.layers.1.self_attn.indexer.weights_proj.weight"].dtype == torch.float32
    back = load_hf(tmp_path)
    ours, theirs = model.layers[1].attn.indexer, back.layers[1].attn.indexer
    assert torch.equal(theirs.weights_proj.weight, ours.weights_proj.weight)
    assert torch.equal(theirs.k_norm.bias, ours.k_norm.bias)
    assert 0 < rel_err(theirs.wq_b.weight, ours.wq_b.weight) < 0.07  # e4m3 keeps 3 mantissa bits


def test_small_v32_pretrains_with_warmup_then_sparse(tmp_path):
    """Dense warm-up then sparse training with the indexer KL in the loss (recorded as indexer_kl)."""
    from tests.test_v4 import pretrain_tiny

    corpus = tmp_path / "docs.txt"
    r = random.Random(0)
    words = "one two three four five six seven eight nine ten".split()
    corpus.write_text("\n\n".join(" ".join(r.choice(words) for _ in range(60)) + "." for _ in range(200)))
    rows = pretrain_tiny("tiny-v32", corpus, tmp_path / "run", extra=["--index-warmup", "0.5"])
    assert all(row["indexer_kl"] >= 0 for row in rows) and rows[-1]["loss"] < rows[0]["loss"] - 0.3
    import nanoseek

    model, _ = nanoseek.load(tmp_path / "run")
    assert isinstance(model, TransformerV32)


def test_mtp_cached_equals_full_mtp():
    from tests.test_v4 import check_mtp_cached

    check_mtp_cached(tiny_v32())
