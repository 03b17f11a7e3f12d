"""The precision policy (auto's rule from what the hardware is, with no timing; bad input) and bf16 mixed precision
against fp32: forward, gradients, fused attention, cross-entropy, FP8 on top, cached decoding, and bit-exact
kill/resume of pretraining.

Tolerances. bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-9 relative, and a forward pass
rounds every activation after every matmul, norm and residual add. Over the tiny model's 3 layers (+ MTP) the
measured logit error is ~1.5% of the largest logit (norm) and ~2.5% (max); we allow 2^-5 ≈ 3.1% (norm) and 2^-4
(max, 16 roundings' worth). A token whose top-k experts change between fp32 and bf16 (a near tie in the router's
scores, ~3% of tokens here) gets a different function altogether, so MoE comparisons are made on the tokens routed
alike in both precisions, and the share of such tokens is checked on its own.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek import checkpoint as ckpt
from nanoseek import kernels
from nanoseek.cli import main
from nanoseek.engine import Engine, SamplingParams
from nanoseek.fp8 import FP8Experts, FP8Linear, convert_to_fp8
from nanoseek.losses import cross_entropy_reference, linear_cross_entropy, lm_loss
from nanoseek.model import Experts, RMSNorm, RouterLog, _dispatch
from nanoseek.optim import build_optimizer
from nanoseek import runtime
from nanoseek.runtime import (MixedPrecision, Runtime, bf16_probe, prepare_for_training, prepare_inference,
                              probe_shapes, resolve)
from nanoseek.stages.common import read_metrics

BF16_NORM_TOL = 2.0**-5  # ‖bf16 - fp32‖ / ‖fp32‖ of logits (see the module docstring)
BF16_MAX_TOL = 2.0**-4  # max |bf16 - fp32| / max |fp32| of logits


def rel_norm(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def rel_max(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def bf16_runtime():
    """A bf16 Runtime built directly: `resolve("cpu", "bf16")` would warn on a CPU without native bf16."""
    return Runtime(torch.device("cpu"), "bf16", "requested", "bf16")


def random_model(seed=0, std=0.1, **kw):
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", **kw))
    model.init_weights(std=std)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "score_func"):
                m.bias.normal_(0, 0.1)
    return model


# ----------------------------------------------------------------------------- policy


@pytest.fixture
def no_timing(monkeypatch):
    """Every stopwatch in runtime raises: the precision policy must decide without one."""
    def refuse(*args, **kwargs):
        raise AssertionError("resolve timed a matmul")

    for name in ("bf16_probe", "matmul_peak", "_seconds_per_matmul"):
        monkeypatch.setattr(runtime, name, refuse)
    monkeypatch.setattr(runtime, "_WARNED", set())  # a fresh once-per-process memory for the warning tests


def test_auto_follows_what_the_cpu_is(monkeypatch, no_timing):
    """bf16 only on a CPU with native bf16, and there for training and for decoding 128 rows or more together."""
    for native in (False, True):
        monkeypatch.setattr(runtime, "native_bf16", lambda: native)
        bf16_if_native = "bf16" if native else "fp32"
        assert resolve("cpu", "auto", training=True).precision == bf16_if_native
        assert resolve("cpu", "auto", rows=1, training=True).precision == bf16_if_native  # a GRPO update's rows
        assert resolve("cpu", "auto").precision == bf16_if_native  # prefill-sized: 1,024 rows
        for rows in (1, 32, runtime.DECODE_BF16_ROWS - 1):  # chat, small batches: a bf16 call's fixed cost
            assert resolve("cpu", "auto", rows=rows).precision == "fp32", (native, rows)
        for rows in (runtime.DECODE_BF16_ROWS, 800):  # an evaluation's n × k
            assert resolve("cpu", "auto", rows=rows).precision == bf16_if_native, (native, rows)
        assert resolve("cpu", "fp32", training=True).precision == "fp32"
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    rt = resolve("cpu", "auto", training=True)
    assert rt.describe() == {"device": "cpu", "precision": "fp32", "requested": "auto", "reason": rt.reason}
    assert rt.reason.startswith("CPU without native bf16") and rt.checkpoint_meta() == {
        "precision": "fp32", "precision_reason": rt.reason}
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    rt = resolve("cpu", "auto", rows=800)
    assert rt.precision == "bf16" and rt.dtype == torch.bfloat16 and "800 rows" in rt.reason
    assert resolve("cpu", "fp32").describe() == {"device": "cpu", "precision": "fp32", "requested": "fp32",
                                                 "reason": "requested"}


def test_auto_gives_the_same_answer_every_time(no_timing):
    """The real CPU's answer, asked twice per stage kind: a policy, not a measurement."""
    for kw in ({"training": True}, {"rows": 1}, {"rows": 32}, {"rows": 160}, {}):
        first, second = resolve("cpu", "auto", **kw), resolve("cpu", "auto", **kw)
        assert first == second and first.reason == second.reason
        assert first.precision == ("bf16" if runtime.native_bf16() and (kw.get("training") or kw.get("rows", 1024)
                                                                        >= runtime.DECODE_BF16_ROWS) else "fp32")


def test_eval_decides_auto_precision_at_its_decoding_batch_unless_the_checkpoint_recorded_one(tmp_path, capsys,
                                                                                             monkeypatch):
    """A checkpoint that recorded no precision (an import, an older run) is scored in what the rows decoded together
    call for; one that recorded its precision is scored in it, whatever the rows (every evaluation of a run computed
    one way)."""
    run = tmp_path / "tiny"
    assert main(["pretrain", "--preset", "tiny", "--out", str(run), "--steps", "1", "--n-problems", "50",
                 "--precision", "fp32"]) == 0
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)  # as on an AMX or AVX512-BF16 CPU

    def evaluated(n, k):
        capsys.readouterr()
        assert main(["eval", "--ckpt", str(run), "--task", "chain_sum", "--n", str(n), "--k", str(k),
                     "--max-new-tokens", "4", "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    for n, k in ((8, 1), (40, 4)):  # 8 rows decode together, then 160: the checkpoint's fp32 both times
        record = evaluated(n, k)
        assert record["precision"] == "fp32" and "recorded by the checkpoint" in record["runtime"]["reason"]
    meta = ckpt.step_dirs(run)[-1] / "meta.json"  # meta.json is outside its own checksums: forget the record
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                                if not k.startswith("precision")}))
    assert ckpt.recorded_precision(run) is None
    for n, k, expected in ((8, 1, "fp32"), (40, 4, "bf16")):
        record = evaluated(n, k)
        assert record["precision"] == expected and f"{n * k} rows" in record["runtime"]["reason"]


def test_a_recorded_precision_wins_under_auto_where_the_hardware_runs_it(monkeypatch, no_timing):
    for native in (False, True):
        monkeypatch.setattr(runtime, "native_bf16", lambda: native)
        for kw in ({"training": True}, {"rows": 1}, {"rows": 800}):
            assert resolve("cpu", "auto", recorded="fp32", **kw).precision == "fp32"
            rt = resolve("cpu", "auto", recorded="bf16", **kw)
            assert rt.precision == ("bf16" if native else "fp32"), (native, kw)  # never emulated by default
            assert "recorded" in rt.reason
            assert resolve("cpu", "fp32", recorded="bf16", **kw).reason == "requested"  # a flag overrides it
        assert resolve("cpu", "auto", rows=800, recorded=None).precision == ("bf16" if native else "fp32")


def test_training_stages_take_bf16_where_decoding_few_rows_does_not(tmp_path, capsys, monkeypatch):
    """On a CPU with native bf16 pretraining and SFT train in bf16 and say why in their run files and checkpoints,
    and evaluation of the same checkpoint decoding 32 rows together uses the bf16 it recorded. (This CPU may emulate bf16:
    the model is tiny and trains one step, and pretraining's MFU peak is stubbed, since with native_bf16 patched
    it would time emulated bf16 matmuls.)"""
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    monkeypatch.setattr("nanoseek.stages.pretrain.matmul_peak", lambda *args, **kwargs: 1e12)
    run = tmp_path / "tiny"
    assert main(["pretrain", "--preset", "tiny", "--out", str(run), "--steps", "1", "--n-problems", "50",
                 "--seq-len", "32", "--batch-size", "4", "--eval-batches", "0"]) == 0
    recorded = json.loads((run / "runtime.json").read_text())
    assert recorded["precision"] == "bf16" and recorded["reason"].endswith("training in bf16")
    meta = json.loads((ckpt.step_dirs(run)[-1] / "meta.json").read_text())
    assert (meta["precision"], meta["precision_reason"]) == ("bf16", recorded["reason"])
    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps({"prompt": "What is 2 + 3?", "completion": "5"}) + "\n")
    sft = tmp_path / "sft"
    assert main(["sft", "--init", str(run), "--data", str(traces), "--out", str(sft), "--epochs", "1"]) == 0
    assert json.loads((sft / "run.json").read_text())["runtime"]["precision"] == "bf16"
    assert json.loads((ckpt.step_dirs(sft)[-1] / "meta.json").read_text())["precision"] == "bf16"
    capsys.readouterr()  # 32 rows decoded together would be fp32 by the rows rule; the checkpoint recorded bf16
    assert main(["eval", "--ckpt", str(run), "--task", "chain_sum", "--n", "8", "--k", "4", "--max-new-tokens",
                 "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["precision"] == "bf16" and record["runtime"]["reason"] == "recorded by the checkpoint (bf16)"


def test_forced_bf16_on_a_cpu_without_native_bf16_warns_once_and_measures_nothing(monkeypatch, no_timing):
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"no native bf16 .*emulated.*auto would choose fp32") as caught:
        assert resolve("cpu", "bf16").precision == "bf16"
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve("cpu", "bf16", rows=1).reason.startswith("requested; emulated")  # said once per process
        monkeypatch.setattr(runtime, "_WARNED", set())
        monkeypatch.setattr(runtime, "native_bf16", lambda: True)
        assert resolve("cpu", "bf16").precision == "bf16"  # native: nothing to warn about


@pytest.mark.parametrize("bad", ["fp16", "BF16", ""])
def test_unknown_precision_is_one_line_value_error(bad):
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16") as e:
        resolve("cpu", bad)
    assert "\n" not in str(e.value)


def test_the_bench_probe_measures_the_models_shapes_once():
    """bf16_probe is a measurement for bench/eval_precision.py (no longer a decision): cached per process."""
    cfg = get_preset("small")
    assert probe_shapes(cfg) == ((1024, 128, 384), (1024, 256, 128), (1024, 256, 768))
    shapes = [(32, 48, 16)]
    first = bf16_probe(shapes, seconds=0.01)
    assert first["fp32_gflops"] > 0 and first["bf16_gflops"] > 0 and first["shapes"] == [[32, 48, 16]]
    assert bf16_probe(shapes, seconds=0.01) is first  # cached per process (and thread count)


def test_mfu_peak_is_never_timed_in_emulated_bf16(monkeypatch):
    """MFU divides by the compute precision's peak, but where bf16 is emulated by fp32's: timing emulated bf16
    matmuls took minutes per process on an AVX2 CPU."""
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    assert runtime.peak_dtype("cpu", torch.bfloat16) == runtime.peak_dtype("cpu") == torch.float32
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    assert runtime.peak_dtype("cpu", torch.bfloat16) == torch.bfloat16
    assert runtime.peak_dtype("cpu", torch.float32) == torch.float32


def test_bad_precision_on_the_cli_exits_2(tmp_path, capsys):
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "a"), "--precision", "fp16"]) == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- mixed precision numerics


def test_fp32_training_forward_is_the_model_itself():
    model = random_model()
    assert prepare_for_training(model, resolve("cpu", "fp32")) is model


def test_bf16_forward_and_gradients_close_to_fp32_dense():
    model = random_model(n_dense_layers=3)
    tokens = torch.randint(0, 256, (2, 49), generator=torch.Generator().manual_seed(1))
    mp = prepare_for_training(model, bf16_runtime())
    assert isinstance(mp, MixedPrecision)
    with torch.no_grad():
        ref, out = model(tokens), mp(tokens)
    assert out.dtype == torch.bfloat16
    assert rel_norm(out, ref) < BF16_NORM_TOL and rel_max(out, ref) < BF16_MAX_TOL
    grads = {}
    for name, fwd in (("fp32", model), ("bf16", mp)):
        model.zero_grad()
        loss, mtp = lm_loss(fwd, tokens[:, :-1], tokens[:, 1:])
        (loss + 0.3 * mtp[0]).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads["fp32"].items():
        assert grads["bf16"][n].dtype == torch.float32, n  # gradients land on the fp32 masters
        # a weight's gradient sums products of a forward activation and a backward signal, each within the
        # forward budget: twice it per tensor (measured ≤ 3.3%, in the q path, whose scores are bf16 GEMMs) ...
        assert rel_norm(grads["bf16"][n], g) < 2 * BF16_NORM_TOL, n
    flat = [torch.cat([g.flatten() for g in grads[k].values()]) for k in ("bf16", "fp32")]
    assert rel_norm(*flat) < BF16_NORM_TOL  # ... and the forward budget over the whole gradient (measured 1.9%)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_moe_forward_close_to_fp32_on_tokens_routed_alike():
    model = random_model()
    tokens = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(2))
    mp = MixedPrecision(model, torch.bfloat16)
    logs = RouterLog(), RouterLog()
    with torch.no_grad():
        ref, out = model(tokens, router_log=logs[0]), mp(tokens, router_log=logs[1])
    same = torch.stack([(a[1].sort(-1)[0] == b[1].sort(-1)[0]).all(-1) for a, b in zip(*logs)]).all(0)
    assert same.float().mean() > 0.9  # near ties in the router flip only a few tokens
    assert all(s.dtype == torch.float32 for s, _ in logs[1])  # router scores stay fp32
    # a flipped token changes every later position through attention: compare each sequence before its first flip
    clean = same.view(tokens.shape).long().cumprod(dim=1).bool()
    assert clean.sum() > tokens.numel() // 4
    assert rel_norm(out[clean], ref[clean]) < BF16_NORM_TOL and rel_max(out[clean], ref[clean]) < BF16_MAX_TOL


def test_router_embedding_and_buffers_stay_fp32_in_compute():
    model = random_model()
    mp = MixedPrecision(model, torch.bfloat16)
    weights = mp.compute_weights()
    assert "embed.weight" not in weights and not any(n.endswith("gate.weight") for n in weights)
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    inf = prepare_inference(copy.deepcopy(model), bf16_runtime())
    gate = inf.layers[1].ffn.gate
    assert gate.weight.dtype == gate.bias.dtype == inf.freqs_cis.dtype == torch.float32
    assert inf.embed.weight.dtype == torch.float32 and inf.head.weight.dtype == torch.bfloat16  # fp32 residual


def test_bf16_inference_model_computes_what_mixed_precision_training_computes():
    model = random_model()
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        train = MixedPrecision(model, torch.bfloat16)(tokens, return_mtp=True)
        infer = prepare_inference(copy.deepcopy(model), bf16_runtime())(tokens, return_mtp=True)
    assert torch.equal(train[0], infer[0]) and torch.equal(train[1][0], infer[1][0])


def test_the_residual_stream_stays_fp32_while_the_matmuls_run_in_bf16():
    """Mixed precision keeps the sum of the blocks' outputs in fp32 (a bf16 sum rounds away updates below 2^-8
    of its size), in training and in inference; what each block's matmuls see is bf16."""
    model = random_model()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    for forward in (MixedPrecision(model, torch.bfloat16), prepare_inference(copy.deepcopy(model), bf16_runtime())):
        owner = forward.model if isinstance(forward, MixedPrecision) else forward
        seen = []
        hooks = [owner.layers[0].register_forward_pre_hook(lambda m, a: seen.append(("residual", a[0].dtype))),
                 owner.layers[0].attn.register_forward_pre_hook(lambda m, a: seen.append(("attn", a[0].dtype))),
                 owner.norm.register_forward_hook(lambda m, a, out: seen.append(("final", out.dtype)))]
        with torch.no_grad():
            forward(tokens)
        for h in hooks:
            h.remove()
        assert seen == [("residual", torch.float32), ("attn", torch.bfloat16), ("final", torch.bfloat16)]
    # MixedPrecision sets the norms' rounding for its call only: the fp32 model runs as itself, fp32 in, fp32 out
    assert all(m.out_dtype is None for m in model.modules() if isinstance(m, RMSNorm))
    with torch.no_grad():
        assert model(tokens).dtype == torch.float32
    back = prepare_inference(prepare_inference(copy.deepcopy(model), bf16_runtime()), resolve("cpu", "fp32"))
    with torch.no_grad():  # an inference model prepared again in fp32 computes in fp32 throughout
        assert back(tokens).dtype == torch.float32 and all(p.dtype == torch.float32 for p in back.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_latent_attention_equals_blockwise_reference(dtype, packed):
    attn = random_model().layers[0].attn
    B, T, H, C, R = 2, 40, attn.n_heads, attn.kv_lora_rank, attn.qk_rope_head_dim
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, T, H, C + R, generator=gen).to(dtype).requires_grad_()
    kv = torch.randn(B, T, C, generator=gen).to(dtype).requires_grad_()
    pe = torch.randn(B, T, R, generator=gen).to(dtype).requires_grad_()
    segments = torch.tensor([[0] * 10 + [1] * 30, [0] * 25 + [1] * 15]) if packed else None
    outs, grads = [], []
    for fused in (True, False):
        k = torch.cat([kv, pe], -1)
        o = (kernels.latent_causal(q, k, kv, segments, attn.softmax_scale) if fused
             else attn._latent_blocks(q, k, kv, None, segments, 16))
        outs.append(o)
        grads.append(torch.autograd.grad(o.float().square().sum(), (q, kv, pe)))
    # fp32: the same sums in another order; bf16: the fused kernel rounds its probabilities to bf16 before P·V
    # and rescales after, the blockwise path normalises first: one bf16 rounding apart (2^-8 relative)
    tol = 1e-5 if dtype == torch.float32 else 2.0**-6
    assert rel_max(outs[0], outs[1]) < tol
    for a, b in zip(*grads):
        assert rel_norm(a, b) < tol


def test_padded_expert_dispatch_is_a_consistent_layout():
    indices = torch.tensor([[3, 0], [0, 2], [3, 1], [0, 3]])  # N=4 tokens, K=2
    src, slot_pos, ends = _dispatch(indices, 4, multiple=4)
    assert ends.tolist() == [4, 8, 12, 16] and src.shape == (16,)  # every group padded to 4 rows
    assert torch.equal(src[slot_pos], torch.arange(8))  # each slot sits in the row that holds it
    starts = [0, 4, 8, 12]
    for e in range(4):  # an expert's rows hold exactly its slots, in token order, then padding (= N·K)
        mine = [s for s in range(8) if indices.flatten()[s] == e]
        assert src[starts[e]:ends[e]].tolist() == mine + [8] * (4 - len(mine))


def test_grouped_bf16_experts_with_padding_equal_the_loop():
    assert kernels.group_rows(torch.bfloat16) > 1 == kernels.group_rows(torch.float32)  # bf16 groups are padded
    torch.manual_seed(6)
    experts = Experts(8, 64, 32).to(torch.bfloat16)
    torch.nn.init.normal_(experts.w1, std=0.1), torch.nn.init.normal_(experts.w2, std=0.1)
    torch.nn.init.normal_(experts.w3, std=0.1)
    x = torch.randn(200, 64).to(torch.bfloat16).requires_grad_()
    indices = torch.stack([torch.randperm(8)[:2] for _ in range(200)])
    weights = torch.rand(200, 2).to(torch.bfloat16)
    outs, grads = [], []
    for fn in (experts, experts.forward_loop):
        y = fn(x, weights, indices)
        outs.append(y)
        grads.append(torch.autograd.grad(y.float().square().sum(), (x, experts.w1, experts.w2, experts.w3)))
    assert rel_max(outs[0], outs[1]) < 2.0**-7  # the same bf16 products, summed by different kernels
    for a, b in zip(*grads):
        assert rel_norm(a, b) < 2.0**-7


def test_linear_cross_entropy_in_bf16_matches_the_fp32_reference():
    gen = torch.Generator().manual_seed(5)
    h = (torch.randn(300, 64, generator=gen)).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(1000, 64, generator=gen) * 0.2).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 1000, (300,), generator=gen)
    targets[::7] = -100
    loss = linear_cross_entropy(h, w, targets)
    gh, gw = torch.autograd.grad(loss, (h, w))
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = cross_entropy_reference(hf, wf, targets)
    rh, rw = torch.autograd.grad(ref, (hf, wf))
    assert gh.dtype == gw.dtype == torch.bfloat16
    # the only rounding before the fp32 softmax is the bf16 logits (2^-9 relative, ~0.01 absolute here)
    assert abs(loss.item() - ref.item()) / ref.item() < 2.0**-9
    assert rel_norm(gh, rh) < 2.0**-6 and rel_norm(gw, rw) < 2.0**-6


def test_linear_cross_entropy_when_the_target_probability_underflows():
    """The loss reads -log p[target] from the fused softmax; rows where p underflows (losses over ~69) fall back
    to log-sum-exp, so even absurd logits give the reference's finite loss."""
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(64, 32, generator=gen) * 40
    w = torch.randn(500, 32, generator=gen)
    targets = torch.randint(0, 500, (64,), generator=gen)
    ref = cross_entropy_reference(h, w, targets)
    assert ref.item() > 100  # most rows underflow
    assert abs(linear_cross_entropy(h, w, targets).item() - ref.item()) / ref.item() < 1e-6


def test_fp8_with_bf16_runs_and_trains_close_to_fp32():
    cfg = get_preset("tiny", dim=128, inter_dim=256, moe_inter_dim=64)
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name in ("fp32", "fp8+bf16"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        fwd = model
        if name != "fp32":
            convert_to_fp8(model, "blockwise")
            fwd = prepare_for_training(model, bf16_runtime())
            fp8_layers = {n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}
            assert fp8_layers and not {n.rsplit(".", 1)[0] for n in fwd.names} & fp8_layers  # quantised from fp32
        opt = build_optimizer(model, lr=3e-3)
        for _ in range(5):
            loss, mtp = lm_loss(fwd, tokens[:, :-1], tokens[:, 1:])
            (loss + 0.3 * mtp[0]).backward()
            opt.step()
            opt.zero_grad()
        losses[name] = loss.item()
    # FP8 alone stays within 1% of fp32 (test_fp8); bf16 around it adds its ~0.2% per rounding, not more
    assert abs(losses["fp8+bf16"] - losses["fp32"]) / losses["fp32"] < 0.015


# ----------------------------------------------------------------------------- decoding


def test_bf16_cached_decode_equals_bf16_full_forward():
    """The latent cache in bf16 against re-running the whole sequence through the bf16 model.

    Cached decoding attends one query at a time (the blockwise kernel), the full forward runs the fused causal
    kernel: the same sums in a different order, so logits agree to bf16 rounding, not bit for bit, and greedy
    decoding may take the other of two tokens whose logits tie within that rounding. So: every greedy token is
    the full forward's argmax up to 2^-6 of the largest logit, and almost all are its exact argmax."""
    model = prepare_inference(random_model(std=0.02, max_seq_len=128, attn_impl="absorb").eval(), bf16_runtime())
    B, L, steps = 3, 9, 30
    tokens = torch.randint(0, 256, (B, L + steps), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(B, L + steps)
    assert cache.kv.dtype == torch.bfloat16
    with torch.no_grad():
        full = model(tokens).float()
        h = model.hidden_cached(tokens[:, :L], torch.arange(L).expand(B, L), cache.main)
        assert rel_max(model.head(h), full[:, :L]) < 2.0**-6
        for t in range(L, L + steps):
            h = model.hidden_cached(tokens[:, t:t + 1], torch.full((B, 1), t), cache.main)
            assert rel_max(model.head(h[:, 0]), full[:, t]) < 2.0**-6, t
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    exact = 0
    for prompt, g in zip(prompts, Engine(model).generate(prompts, SamplingParams(max_new_tokens=30, temperature=0))):
        with torch.no_grad():  # the full forward's logits at every generated position, teacher-forced
            logits = model(torch.tensor([prompt + g.tokens]))[0, len(prompt) - 1:-1].float()
        chosen = logits.gather(1, torch.tensor(g.tokens)[:, None])[:, 0]
        gap = (logits.max(-1).values - chosen) / logits.abs().max()
        assert (gap <= 2.0**-6).all()
        exact += int((gap == 0).sum())
    assert exact >= 0.95 * 3 * 30


# ----------------------------------------------------------------------------- pretraining in bf16


def tiny_args(corpus, out, steps=16, extra=()):
    return ["pretrain", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--steps", str(steps),
            "--batch-size", "8", "--micro-batch", "4", "--seq-len", "32", "--save-every", "4", "--eval-every", "8",
            "--eval-batches", "2", "--precision", "bf16", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    r = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the big red house under the blue sky near the old river".split()
    docs = [" ".join(r.choice(words) for _ in range(r.randint(20, 90))) + "." for _ in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(docs))
    return path


def losses(out):
    return [(r["step"], r["loss"], r.get("mtp_loss"), r["grad_norm"], r.get("heldout_loss"))
            for r in read_metrics(out / "metrics.jsonl")]


def test_bf16_pretraining_kill_and_resume_is_bit_identical(corpus, tmp_path):
    """SIGKILL mid-run, then --resume (which keeps the run's precision): the bf16 loss sequence, bit for bit.

    The child reaches its step-4 checkpoint in seconds even where bf16 is emulated (nothing times bf16 there: the
    MFU peak is fp32's); the deadline is only a safety net against a hung child."""
    assert main(tiny_args(corpus, tmp_path / "a")) == 0
    reference = losses(tmp_path / "a")
    run_cfg = (tmp_path / "a" / "run.json").read_text()
    assert '"precision": "bf16"' in run_cfg and (tmp_path / "a" / "runtime.json").exists()
    cmd = [sys.executable, "-m", "nanoseek", *tiny_args(corpus, tmp_path / "b")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 7):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # after step 7 the step-4 checkpoint exists, and 9 steps are still to come
    assert proc.wait() == -signal.SIGKILL, "the child ended before it was killed"
    assert len(ckpt.step_dirs(tmp_path / "b")) >= 1, "the child wrote no checkpoint before it was killed"
    assert main(["pretrain", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert losses(tmp_path / "b") == reference
    fp32 = tmp_path / "c"
    assert main(tiny_args(corpus, fp32, extra=("--precision", "fp32"))) == 0
    ref32 = losses(fp32)
    assert reference != ref32  # bf16 really ran in bf16 ...
    assert abs(reference[-1][1] - ref32[-1][1]) / ref32[-1][1] < 0.02  # ... and trains like fp32
