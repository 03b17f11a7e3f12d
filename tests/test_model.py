"""The model's fast paths against their references, and its invariants."""

import pytest
import torch

from nanoseek import Transformer, build_model, get_preset
from nanoseek.config import PRESETS
from nanoseek.losses import lm_loss
from nanoseek.model import MoE, rope_inv_freq, yarn_correction_range
from nanoseek.stats import param_counts


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny(**kw):
    return get_preset("tiny", **kw)


def random_model(cfg, seed=0, std=0.1):
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    model.init_weights(std=std)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "score_func"):
                m.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("q_lora_rank", [0, 32])
@pytest.mark.parametrize("rope_factor", [1.0, 8.0])
def test_naive_equals_absorb(q_lora_rank, rope_factor):
    cfg = tiny(q_lora_rank=q_lora_rank, rope_factor=rope_factor, original_seq_len=16)
    naive = random_model(cfg)
    absorb = Transformer(cfg.replace(attn_impl="absorb")).eval()
    absorb.load_state_dict(naive.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        a, (ma,) = naive(tokens, return_mtp=True)
        b, (mb,) = absorb(tokens, return_mtp=True)
    assert rel_err(b, a) < 1e-5 and rel_err(mb, ma) < 1e-5


def test_absorb_attends_from_a_key_prefix():
    """Queries that are the last T of S positions (what a KV cache feeds) equal those rows of the full pass."""
    cfg = tiny(attn_impl="absorb")
    attn = random_model(cfg).layers[0].attn
    q_nope, q_pe = torch.randn(2, 20, 4, 16), torch.randn(2, 20, 4, 8)
    kv, k_pe = torch.randn(2, 20, 16), torch.randn(2, 20, 1, 8)
    full = attn.attend_absorb(q_nope, q_pe, kv, k_pe, block=6)
    tail = attn.attend_absorb(q_nope[:, -7:], q_pe[:, -7:], kv, k_pe, block=4)
    torch.testing.assert_close(tail, full[:, -7:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, attn.attend_absorb(q_nope, q_pe, kv, k_pe, block=128), rtol=1e-5, atol=1e-6)


def test_grouped_moe_equals_loop_forward_and_backward():
    cfg = tiny(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.3)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.bias.normal_(0, 0.1)
    x = torch.randn(3, 40, cfg.dim, requires_grad=True)
    g = torch.randn(3, 40, cfg.dim)
    fast = moe(x)
    fast.backward(g)
    grads_fast = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    x.grad = None
    moe.zero_grad()
    ref = moe(x, loop=True)
    ref.backward(g)
    grads_ref = [x.grad] + [p.grad for p in moe.parameters()]
    assert rel_err(fast, ref) < 1e-6
    for a, b in zip(grads_fast, grads_ref):
        assert rel_err(a, b) < 1e-5


def test_padded_inference_experts_equal_loop_and_grouped():
    """Inference with few tokens runs the experts as padded batched matmuls (Experts.forward_padded); it must
    equal the one-expert-at-a-time reference, and give way to the grouped path where padding would double rows."""
    cfg = tiny(n_routed_experts=16, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.3)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(64, 1, cfg.dim)  # a decode step of 64 rows
    with torch.no_grad():
        weights, indices, _ = moe.gate(x.flatten(0, 1))
        padded = moe.experts.forward_padded(x.flatten(0, 1), weights, indices)
        assert padded is not None
        assert rel_err(padded, moe.experts.forward_loop(x.flatten(0, 1), weights, indices)) < 1e-6
        assert rel_err(moe(x), moe(x, loop=True)) < 1e-6
        one_expert = torch.zeros_like(indices)  # every token on expert 0: padding would be 8x the rows
        assert moe.experts.forward_padded(x.flatten(0, 1), weights, one_expert) is None
    with torch.enable_grad():  # training never takes the padded path
        xg = x.clone().requires_grad_()
        moe(xg).sum().backward()
        assert xg.grad is not None


def test_rmsnorm_inference_path_is_bit_identical():
    from nanoseek.model import RMSNorm

    norm = RMSNorm(32)
    torch.nn.init.normal_(norm.weight, std=0.5)
    x = torch.randn(5, 7, 32)
    with torch.no_grad():
        fast = norm(x)
    assert torch.equal(fast, norm(x).detach())


def test_experts_with_no_tokens_get_zero_grad():
    cfg = tiny(n_routed_experts=8, n_activated_experts=1, n_expert_groups=1, n_limited_groups=1)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.bias.fill_(-10.0)
    moe.gate.bias[3] = 10.0  # every token routes to expert 3
    x = torch.randn(1, 10, cfg.dim)
    moe(x).sum().backward()
    w1 = moe.experts.w1.grad
    assert w1[3].abs().sum() > 0
    assert torch.all(w1[[e for e in range(8) if e != 3]] == 0)
    ref = moe(x, loop=True)
    assert rel_err(moe(x), ref) < 1e-6


def test_bias_changes_selection_not_weights():
    """V3: the correction bias decides which experts run; the combine weights are the unbiased scores."""
    cfg = tiny(n_routed_experts=8, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1, route_scale=1.0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(64, cfg.dim)
    w0, idx0, scores = moe.gate(x)
    moe.gate.bias.copy_(torch.linspace(-1, 1, 8))
    w1, idx1, scores1 = moe.gate(x)
    assert torch.equal(scores, scores1)  # the bias never enters the scores
    assert not torch.equal(idx0.sort(-1)[0], idx1.sort(-1)[0])  # ... but changes the choice
    chosen = scores.gather(1, idx1)
    torch.testing.assert_close(w1, chosen / chosen.sum(-1, keepdim=True))  # weights: unbiased, renormalised
    biased = scores + moe.gate.bias
    assert torch.equal(idx1.sort(-1)[0], biased.topk(2, dim=-1)[1].sort(-1)[0])


def test_group_limited_routing_keeps_best_groups():
    cfg = tiny(n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=1, route_scale=1.0)
    gate = MoE(cfg).gate
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(128, cfg.dim)
    _, idx, scores = gate(x)
    group_score = scores.view(128, 4, 2).sum(-1)  # sum of top-2 = sum of both in groups of 2
    best = group_score.argmax(-1)
    assert torch.equal(idx // 2, best[:, None].expand(-1, 2))


def test_softmax_routing_uses_max_group_score_and_no_renormalisation():
    cfg = tiny(score_func="softmax", n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
               n_limited_groups=2, route_scale=3.0)
    assert not cfg.normalize_topk
    gate = MoE(cfg).gate
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(64, cfg.dim)
    w, idx, scores = gate(x)
    torch.testing.assert_close(scores.sum(-1), torch.ones(64))
    kept = scores.view(64, 4, 2).amax(-1).topk(2, dim=-1)[1]
    assert all(set((idx[n] // 2).tolist()) <= set(kept[n].tolist()) for n in range(64))
    torch.testing.assert_close(w, 3.0 * scores.gather(1, idx))


def test_mtp_shapes_and_causality():
    cfg = tiny(n_mtp_layers=2)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    logits, mtp = model(tokens, return_mtp=True)
    assert logits.shape == (2, 20, cfg.vocab_size)
    assert [m.shape for m in mtp] == [(2, 19, cfg.vocab_size), (2, 18, cfg.vocab_size)]
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % cfg.vocab_size
    logits2, mtp2 = model(changed, return_mtp=True)

    def same(a, b):  # equal up to rounding (expert batches differ in size, so matmul blocking may too)
        return (a - b).abs().max().item() < 1e-5

    # depth k at position i sees tokens up to i+k only
    assert same(logits[:, :10], logits2[:, :10]) and not same(logits[:, 10], logits2[:, 10])
    assert same(mtp[0][:, :9], mtp2[0][:, :9]) and not same(mtp[0][:, 9], mtp2[0][:, 9])
    assert same(mtp[1][:, :8], mtp2[1][:, :8]) and not same(mtp[1][:, 8], mtp2[1][:, 8])


def test_losses_match_logits():
    cfg = tiny(n_mtp_layers=1)
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[0, 3] = -100
    loss, (mtp_loss,) = lm_loss(model, x, y)
    logits, (mtp_logits,) = model(x, return_mtp=True)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss, ce(logits.flatten(0, 1), y.flatten(), ignore_index=-100))
    torch.testing.assert_close(mtp_loss, ce(mtp_logits.flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100))


def test_deterministic_and_seeded():
    cfg = tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    a = random_model(cfg, seed=3)(tokens)
    b = random_model(cfg, seed=3)(tokens)
    c = random_model(cfg, seed=4)(tokens)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_init_std_and_norms():
    cfg = get_preset("small")
    model = Transformer(cfg)
    w = model.layers[1].attn.wkv_a.weight
    assert abs(w.std().item() - 0.006) < 0.0005
    assert torch.all(model.norm.weight == 1) and torch.all(model.layers[1].ffn.gate.bias == 0)


def test_dtype_cast_keeps_fp32_routing_bias_and_rope():
    """A cast by hand rounds the weights only: the routing bias stays an fp32 buffer (Gate._apply) and the RoPE
    tables, kept as fp32 bit patterns, are not touched at all (V3's and V4's)."""
    model = Transformer(tiny(rope_factor=4.0, original_seq_len=16))
    rope = model.freqs_cis.clone()
    model = model.to(torch.bfloat16)
    assert model.layers[1].ffn.gate.bias.dtype == torch.float32
    assert model.freqs_cis.dtype == torch.float32 and torch.equal(model.freqs_cis, rope)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 256, (1, 8))).dtype == torch.bfloat16
    v4 = build_model(get_preset("tiny-v4"))
    tables = [v4.table(kind).clone() for kind in ("sliding", "csa")]
    v4 = v4.half().to(torch.bfloat16)
    assert all(torch.equal(v4.table(kind), t) for kind, t in zip(("sliding", "csa"), tables))


def test_model_py_holds_the_math_not_the_precision_policy_or_device_kernel_choices():
    """model.py is the papers' math: the precision policy (which weights stay fp32, what the norms round to) is
    applied from outside by runtime.py, and kernel choices that depend on a tensor's device or dtype live in
    kernels.py. A cheap guard against their coming back."""
    from pathlib import Path

    import nanoseek.model

    source = Path(nanoseek.model.__file__).read_text()
    for banned in ('"cpu"', "'cpu'", "device.type", "ContextVar", "contextvars", "torch.bfloat16", "torch.float16",
                   "keep_fp32", "runtime import"):
        assert banned not in source, banned
    assert "onednn" not in source.lower()


def test_dense_only_model():
    cfg = tiny(n_dense_layers=3, n_mtp_layers=1)
    model = random_model(cfg)
    assert not any(isinstance(m, MoE) for m in model.modules())
    loss, (mtp,) = lm_loss(model, torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 9)))
    assert loss.isfinite() and mtp.isfinite()


def test_sequence_longer_than_max_is_an_error():
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_yarn_matches_reference_numbers():
    """V3's YaRN: correction range [10, 23] of 32 pairs; softmax scale 0.1352338 (YaRN, arXiv 2309.00071 §3, with V3's published rope_scaling)."""
    cfg = get_preset("deepseek-v3")
    assert yarn_correction_range(cfg) == (10, 23)
    assert abs(cfg.softmax_scale - 0.1352338) < 1e-6
    f = rope_inv_freq(cfg)
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.testing.assert_close(f[:11], base[:11])  # pairs <= low keep their frequency
    torch.testing.assert_close(f[23:], base[23:] / 40)  # pairs >= high are divided by the factor
    assert abs(get_preset("deepseek-v2-lite").softmax_scale - 0.1147214) < 1e-6


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("deepseek")])
def test_big_presets_build_on_meta_with_official_shapes(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = build_model(cfg)  # V3.2 / V4 presets build their own generation
    assert all(p.is_meta for p in model.parameters())
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    counts = param_counts(cfg)
    assert main == counts["total_params"] and mtp == counts["mtp_params"]
    if name == "deepseek-v3":
        attn = model.layers[5].attn
        assert attn.wq_a.weight.shape == (1536, 7168) and attn.wq_b.weight.shape == (24576, 1536)
        assert attn.wkv_a.weight.shape == (576, 7168) and attn.wkv_b.weight.shape == (32768, 512)
        assert attn.wo.weight.shape == (7168, 16384)
        assert model.layers[2].ffn.w1.weight.shape == (18432, 7168)  # layers 0-2 dense
        moe = model.layers[3].ffn
        assert moe.experts.w1.shape == (256, 2048, 7168) and moe.experts.w2.shape == (256, 7168, 2048)
        assert moe.gate.weight.shape == (256, 7168) and moe.shared_experts.w1.weight.shape == (2048, 7168)
        assert model.mtp[0].eh_proj.weight.shape == (7168, 14336) and len(model.layers) == 61
    if name == "deepseek-v2-lite":
        assert model.layers[1].attn.wq.weight.shape == (16 * 192, 2048)
        assert not hasattr(model.layers[1].attn, "wq_a")


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_packed_samples_equal_separate_forwards(attn_impl):
    """Two samples packed in one row, with restarted positions and segment masking, equal each run alone."""
    model = random_model(tiny(attn_impl=attn_impl))
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    segments = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        h = model.hidden(packed, positions=positions, segments=segments)
        torch.testing.assert_close(h[:, :7], model.hidden(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h[:, 7:], model.hidden(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_document_mask_makes_a_packed_document_see_only_itself(attn_impl):
    """pretrain --document-mask: a document packed after another scores exactly as it does alone from position 0."""
    from nanoseek.losses import document_segments

    cfg = tiny(attn_impl=attn_impl, n_mtp_layers=0)
    model = random_model(cfg)
    eos = 1
    a, b = torch.randint(2, cfg.vocab_size, (1, 13)), torch.randint(2, cfg.vocab_size, (1, 20))
    packed = torch.cat([a, torch.tensor([[eos]]), b], dim=1)
    with torch.no_grad():
        together = model(packed, **document_segments(packed, eos))
        alone = model(b)
        unmasked = model(packed)
    torch.testing.assert_close(together[:, 14:], alone, rtol=1e-5, atol=1e-5)
    assert (unmasked[:, 14:] - alone).abs().max() > 1e-3  # without the mask the first document leaks in
