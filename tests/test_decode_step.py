"""The folded decode step (nanoseek/decode_step.py) against its reference, `Transformer.hidden_cached`."""

import pytest
import torch

from nanoseek import Transformer, build_model, get_preset
from nanoseek.decode_step import MAX_FOLD_GROWTH, DecodeStep, fold_growth
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import Gate
from nanoseek.routing import moe_gates
from nanoseek.runtime import Runtime, prepare_inference

CONFIGS = {
    "tiny": {},  # query LoRA, 1 shared expert stacked with the routed ones, grouped sigmoid routing
    "no-q-lora, bias, 2 shared": dict(q_lora_rank=0, attn_bias=True, n_shared_experts=2),
    "softmax, one group": dict(score_func="softmax", n_expert_groups=1, n_limited_groups=1, route_scale=1.0),
    "no shared expert": dict(n_shared_experts=0),
    # 32 experts: at 5 rows the padded groups would be > 8× the slots, so the model's own experts run
    "many experts": dict(n_routed_experts=32),
}


def model_for(**overrides):
    torch.manual_seed(0)
    m = Transformer(get_preset("tiny", max_seq_len=128, **overrides)).eval()
    m.init_weights(std=0.1)
    with torch.no_grad():
        for g in m.modules():
            if isinstance(g, Gate):
                g.bias.normal_(0, 0.1)
            elif hasattr(g, "bias") and isinstance(g.bias, torch.nn.Parameter):
                g.bias.normal_(0, 0.1)
    return m


def both_steps(model, step, B, prompt_len=9, steps=6, positions=None):
    """Prefill B rows, then decode `steps` tokens per row through `step` and through hidden_cached, each on its
    own copy of the cache; rows sit at different positions. Returns the two (B, steps, D) outputs and caches."""
    gen = torch.Generator().manual_seed(B)
    tokens = torch.randint(0, 256, (B, prompt_len + steps), generator=gen)
    ours, ref = model.new_cache(B, 64), model.new_cache(B, 64)
    start = torch.tensor(positions if positions is not None else [prompt_len - (b % 3) for b in range(B)])
    outs = ([], [])
    with torch.no_grad():
        for cache in (ours, ref):
            model.hidden_cached(tokens[:, :prompt_len], torch.arange(prompt_len).expand(B, prompt_len), cache.main)
        for t in range(steps):
            pos = (start + t)[:, None]
            tok = tokens[:, prompt_len + t:prompt_len + t + 1]
            outs[0].append(step(tok, pos, ours.main))
            outs[1].append(model.hidden_cached(tok, pos, ref.main))
    return torch.cat(outs[0], 1), torch.cat(outs[1], 1), ours, ref


def close(a, b, rel=1e-5):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < rel


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("B", [1, 2, 5])
def test_step_equals_the_models_cached_forward(name, traced, B):
    """Hidden states and the latents written to the cache agree with hidden_cached at every step, for one row
    and two (experts read in place) and more rows (padded batched experts, or the model's own past 8× padding;
    traced: gathered for few rows, all experts for more)."""
    model = model_for(**CONFIGS[name])
    step = DecodeStep(model, traced=traced)
    got, want, ours, ref = both_steps(model, step, B)
    assert close(got, want)
    assert close(ours.kv, ref.kv) and close(ours.pe, ref.pe)


def test_a_crowded_expert_runs_its_rows_beyond_the_padding_on_its_own():
    """12 rows whose routers all pick one expert: its group (12 slots) outgrows the padded groups (8 rows), and
    the rows beyond go through its own weights; the result still equals the model's."""
    model = model_for()
    with torch.no_grad():
        for gate in moe_gates(model):
            gate.bias[3] += 10.0  # chosen by every token
    routes = []
    hooks = [g.register_forward_hook(lambda m, a, out: routes.append(out[1])) for g in moe_gates(model)]
    got, want, ours, ref = both_steps(model, DecodeStep(model), 12, steps=3)
    for h in hooks:
        h.remove()
    decode_calls = [r for r in routes if r.shape[0] == 12]  # one token per row: the decode steps
    assert decode_calls and all(bool((r == 3).any(1).all()) for r in decode_calls)  # the crowded case ran
    assert close(got, want)
    assert close(ours.kv, ref.kv) and close(ours.pe, ref.pe)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("B", [1, 3])
def test_two_tokens_per_row_and_the_mtp_module(traced, B):
    """Speculative decoding's verify step (2 tokens per row) and its MTP draft step equal the model's, for one row
    (two tokens: each one's experts read in place) and for several (the batched experts)."""
    model = model_for()
    step = DecodeStep(model, traced=traced)
    L = 9
    tokens = torch.randint(0, 256, (B, L + 4), generator=torch.Generator().manual_seed(3))
    ours, ref = model.new_cache(B, 64, with_mtp=True), model.new_cache(B, 64, with_mtp=True)
    with torch.no_grad():
        for cache in (ours, ref):
            h = model.hidden_cached(tokens[:, :L], torch.arange(L).expand(B, L), cache.main)
            model.mtp_cached(1, h[:, :-1], tokens[:, 1:L], torch.arange(L - 1).expand(B, -1), cache.mtp[0])
        pos = torch.tensor([[L - 2, L - 1], [L - 1, L], [L, L + 1]])[-B:]
        pair = tokens.gather(1, pos)
        assert close(step(pair, pos, ours.main), model.hidden_cached(pair, pos, ref.main))
        hm = torch.randn(B, 2, model.cfg.dim, generator=torch.Generator().manual_seed(4))
        nxt = tokens.gather(1, pos + 1)
        assert close(step.mtp_cached(1, hm, nxt, pos, ours.mtp[0]), model.mtp_cached(1, hm, nxt, pos, ref.mtp[0]))
    assert close(ours.kv, ref.kv) and close(ours.pe, ref.pe)


def test_each_generation_sees_the_weights_of_its_step():
    """RL updates the weights between generations with torch's fused AdamW, which does not bump the parameters'
    version counters: every Engine.generate refolds, so its tokens are those of the reference decode path."""
    model = model_for()
    engine, reference = Engine(model), Engine(model, decode="reference")
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    prompts = [[5, 6, 7, 8], [11, 12]]
    outs = []
    for _ in range(3):
        got, want = engine.generate(prompts, params), reference.generate(prompts, params)
        assert [g.tokens for g in got] == [g.tokens for g in want]
        outs.append([g.tokens for g in got])
        model(torch.randint(0, 256, (2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert outs[0] != outs[-1]  # the updates changed what the model says, and both paths followed


def test_gate_hooks_see_every_decode_step():
    """routing.RoutingCapture records the experts through forward hooks on the gates: each MoE gate is called
    once per decode step, with the experts the model itself would choose."""
    model = model_for()
    gates = moe_gates(model)  # the main layers' (the MTP module's gate does not decode)
    seen = {id(g): [] for g in gates}
    for g in gates:
        g.register_forward_hook(lambda m, a, out: seen[id(m)].append(out[1].clone()))
    both_steps(model, DecodeStep(model), 3, steps=4)
    for g in gates:  # 1 prefill per cache (2), then per step: ours, then the reference
        calls = seen[id(g)][2:]
        assert len(calls) == 8
        assert all(torch.equal(calls[i], calls[i + 1]) for i in range(0, 8, 2))


@pytest.mark.parametrize("B", [3, 5])
def test_bf16_step_matches_the_bf16_model(B):
    """In mixed precision (bf16 weights and cache, fp32 router, norms and residual stream) the step computes
    what the bf16 model computes, up to bf16 rounding: 3 rows take the model's experts, 5 the padded ones."""
    model = prepare_inference(model_for(), Runtime("cpu", "bf16"))
    got, want, ours, ref = both_steps(model, DecodeStep(model), B, steps=3)
    assert got.dtype == want.dtype and ours.kv.dtype == torch.bfloat16
    assert close(got, want, rel=3e-2)


def test_models_it_does_not_serve_keep_their_own_forward():
    for family in ("v32", "v4"):
        model = build_model(get_preset(f"tiny-{family}"))
        assert DecodeStep.build(model) is None
    assert DecodeStep.build(model_for()) is not None
    # a latent 4x as wide as the heads' nope and value dims (DeepSeek's proportion): folding would enlarge them
    wide = model_for(kv_lora_rank=64, qk_nope_head_dim=16, v_head_dim=16)
    assert fold_growth(wide.cfg) > MAX_FOLD_GROWTH and DecodeStep.build(wide) is None
