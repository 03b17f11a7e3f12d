"""Fine-grained FP8: quantisation bounds, the three GEMMs against dequantise-then-matmul, the converted model,
BF16 optimiser moments, and FP8 checkpoints."""

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.fp8 import (FP8Experts, FP8Linear, convert_to_fp8, dequantize_act, dequantize_weight, fp8_gemm,
                          fp8_linear, quantize_act, quantize_tensorwise, quantize_weight)
from nanoseek.hf import load_hf, save_hf
from nanoseek.losses import lm_loss
from nanoseek.optim import AdamWBF16Moments, build_optimizer, optimizer_state_bytes

E4M3_REL = 2.0**-4  # 3 mantissa bits: round-to-nearest error ≤ half an ulp = 2^-4 relative


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_act_quantisation_shapes_and_bounds():
    x = torch.randn(5, 300) * torch.logspace(-3, 3, 300)  # magnitudes spanning 6 decades across tiles
    q, s = quantize_act(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3) and s.dtype == torch.float32
    torch.testing.assert_close(s[:, 0], x[:, :128].abs().amax(1) / 448)
    back = dequantize_act(q, s)
    tile_scale = s.repeat_interleave(128, 1)[:, :300]
    # normal numbers: relative half-ulp; the tile's subnormals: absolute half of the smallest step
    assert ((back - x).abs() <= E4M3_REL * x.abs() + tile_scale * 2.0**-10).all()


def test_zeros_tiny_and_huge_values():
    x = torch.zeros(2, 256)
    x[1, :128] = 1e-30
    x[1, 128:] = 1e30
    q, s = quantize_act(x)
    back = dequantize_act(q, s)
    assert torch.equal(back[0], torch.zeros(256))  # an all-zero tile stays exactly zero
    torch.testing.assert_close(back[1, :128], x[1, :128], rtol=0, atol=1e-4 / 448 * 2**-9)  # clamped scale
    torch.testing.assert_close(back[1, 128:], x[1, 128:], rtol=E4M3_REL, atol=0)


def test_ue8m0_scales_are_powers_of_two():
    _, s = quantize_act(torch.randn(4, 256), ue8m0=True)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    _, sw = quantize_weight(torch.randn(200, 300), ue8m0=True)
    assert torch.equal(sw, torch.exp2(torch.log2(sw).round()))


def test_non_finite_input_raises():
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_act(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_weight(torch.tensor([[1.0, float("inf")]]))


@pytest.mark.parametrize("M,N,K", [(64, 96, 128), (130, 200, 300), (7, 5, 64)])
def test_gemm_equals_dequantise_then_matmul(M, N, K):
    torch.manual_seed(M)
    a_q, a_s = quantize_act(torch.randn(M, K))
    w_q, w_s = quantize_weight(torch.randn(N, K))
    ref = dequantize_act(a_q, a_s) @ dequantize_weight(w_q, w_s).T
    assert rel(fp8_gemm(a_q, a_s, w_q, w_s), ref) < 1e-6  # fp32 rounding only
    b_q, b_s = quantize_act(torch.randn(N, K))  # activation-tiled right operand (Wgrad's case)
    assert rel(fp8_gemm(a_q, a_s, b_q, b_s), dequantize_act(a_q, a_s) @ dequantize_act(b_q, b_s).T) < 1e-6


def test_linear_fprop_dgrad_wgrad_match_their_fp8_references():
    torch.manual_seed(0)
    x = torch.randn(200, 300, requires_grad=True)
    w = torch.randn(150, 300, requires_grad=True)
    g = torch.randn(200, 150)
    y = fp8_linear(x, w)
    y.backward(g)
    deq_act = lambda t: dequantize_act(*quantize_act(t))  # noqa: E731
    w_deq = dequantize_weight(*quantize_weight(w.detach()))
    x_deq = deq_act(x.detach())
    assert rel(y, x_deq @ w_deq.T) < 1e-6  # Fprop: 1×128 activation tiles × 128×128 weight blocks
    assert rel(x.grad, deq_act(g) @ w_deq) < 1e-6  # Dgrad: gradient tiles along N, transposed weight blocks
    assert rel(w.grad, deq_act(g.T) @ deq_act(x_deq.T).T) < 1e-6  # Wgrad: both re-tiled along the tokens


def test_linear_gradients_close_to_fp32():
    torch.manual_seed(1)
    x = torch.randn(256, 256, requires_grad=True)
    w = (torch.randn(128, 256) * 0.05).requires_grad_()
    g = torch.randn(256, 128)
    fp8_linear(x, w).backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (x @ w.T).backward(g)
    assert rel(gx, x.grad) < 0.05 and rel(gw, w.grad) < 0.06  # two/three E4M3 roundings compound


def test_fine_grained_scaling_survives_outliers_where_tensorwise_fails():
    torch.manual_seed(2)
    x = torch.randn(256, 512)
    x[:, :128] *= 1e6  # a few huge channels, as in real activations
    q, s = quantize_act(x)
    fine = rel(dequantize_act(q, s)[:, 128:], x[:, 128:])
    qt, st = quantize_tensorwise(x)
    coarse = rel((qt.float() * st)[:, 128:], x[:, 128:])
    assert fine < 0.05 and coarse > 0.5  # per-tensor scaling flushes the ordinary channels


def test_activations_saved_for_backward_are_fp8():
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(512, 256, requires_grad=True)
    w = torch.randn(256, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fp8_linear(x, w)
    fp8_bytes = sum(saved) - w.numel() * 4  # the master weight is saved by reference, not copied
    assert fp8_bytes <= x.numel() * 1 + x.numel() // 128 * 4  # 1 byte per element plus one fp32 per tile


def test_convert_to_fp8_swaps_exactly_deepseeks_layers():
    cfg = get_preset("tiny", n_mtp_layers=1)
    model = Transformer(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_fp8(model)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}
    assert "layers.0.attn.wq_a" in fp8 and "layers.0.attn.wo" in fp8 and "layers.0.ffn.w1" in fp8
    assert "layers.1.ffn.experts" in fp8 and "layers.1.ffn.shared_experts.w2" in fp8 and "mtp.0.eh_proj" in fp8
    assert not {"head", "layers.1.ffn.gate", "embed"} & fp8
    assert not any(isinstance(m, FP8Linear) for n, m in model.named_modules() if "norm" in n)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # same parameters and keys


def test_fp8_model_trains_close_to_fp32():
    cfg = get_preset("tiny", dim=128, inter_dim=256, moe_inter_dim=64)
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = {}
    for recipe in (None, "blockwise"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        if recipe:
            convert_to_fp8(model, recipe)
        opt = build_optimizer(model, lr=3e-3)
        for _ in range(5):
            loss, mtp = lm_loss(model, tokens[:, :-1], tokens[:, 1:])
            (loss + 0.3 * mtp[0]).backward()
            opt.step()
            opt.zero_grad()
        losses[recipe] = loss.item()
    assert abs(losses["blockwise"] - losses[None]) / losses[None] < 0.01


def test_bf16_moments_track_fp32_adamw_with_half_the_memory():
    torch.manual_seed(3)
    ref = torch.nn.Linear(64, 32)
    ours = torch.nn.Linear(64, 32)
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt = AdamWBF16Moments(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randn(128, 64)
    for step in range(20):
        for model, o in ((ref, opt_ref), (ours, opt)):
            model(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
        if step == 0:  # the first update uses the exact moments: the algorithm itself is AdamW's
            torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-6, atol=1e-7)
    # then bf16 rounding of the stored moments (2^-9 relative) accumulates: 20 steps at lr 1e-2 stay within 2%
    assert rel(ours.weight, ref.weight) < 0.02
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    assert optimizer_state_bytes(opt) * 2 == optimizer_state_bytes(opt_ref)  # (scalar step counters not counted)


def test_fp8_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(4)
    model = Transformer(get_preset("tiny", dim=160, inter_dim=192))
    model.init_weights(std=0.1)
    save_hf(model, tmp_path, fp8=True)
    back = load_hf(tmp_path)
    w = model.layers[0].attn.wkv_a.weight
    assert torch.equal(back.layers[0].attn.wkv_a.weight, dequantize_weight(*quantize_weight(w)))
    e = model.layers[1].ffn.experts.w2[3]
    assert torch.equal(back.layers[1].ffn.experts.w2[3], dequantize_weight(*quantize_weight(e)))
    for name in ("embed.weight", "head.weight", "layers.1.ffn.gate.weight", "norm.weight"):
        assert torch.equal(back.state_dict()[name], model.state_dict()[name]), name
