"""The inference engine against the full forward pass, and its batching, sampling and speculative invariants."""

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.engine import Engine, SamplingParams, filtered_probs, speculative_check
from nanoseek.stats import kv_cache_bytes


def model_for(attn_impl="absorb", **kw):
    torch.manual_seed(0)
    m = Transformer(get_preset("tiny", max_seq_len=128, attn_impl=attn_impl, **kw)).eval()
    m.init_weights(std=0.1)
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "score_func"):
                mod.bias.normal_(0, 0.1)
    return m


PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_cached_decode_equals_full_forward(attn_impl):
    """40 decode steps through the latent cache give the logits of re-running the whole sequence."""
    model = model_for(attn_impl)
    B, L, steps = 3, 9, 40
    tokens = torch.randint(0, 256, (B, L + steps), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(B, L + steps)
    with torch.no_grad():
        full = model(tokens)
        h = model.hidden_cached(tokens[:, :L], torch.arange(L).expand(B, L), cache.main, attn_impl=attn_impl)
        assert ((model.head(h) - full[:, :L]).abs().max() / full.abs().max()) < 1e-5
        for t in range(L, L + steps):
            h = model.hidden_cached(tokens[:, t:t + 1], torch.full((B, 1), t), cache.main, attn_impl=attn_impl)
            assert ((model.head(h[:, 0]) - full[:, t]).abs().max() / full.abs().max()) < 1e-5, t


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_reused_slot_never_attends_stale_entries(attn_impl):
    """A cache row that held a long sequence is reused by a new one from position 0, next to a row far ahead (so
    the keys read span the old entries): the new sequence gets exactly the logits of a fresh forward."""
    model = model_for()
    gen = torch.Generator().manual_seed(2)
    old, new = torch.randint(0, 256, (2, 50), generator=gen), torch.randint(0, 256, (1, 12), generator=gen)
    cache = model.new_cache(2, 64)
    with torch.no_grad():
        model.hidden_cached(old, torch.arange(50).expand(2, 50), cache.main)  # both rows hold 50 old entries
        full = model(new)
        for t in range(new.shape[1]):  # row 0 restarts at position 0; row 1 keeps decoding at 50 + t
            toks = torch.stack([new[0, t], old[1, t]])[:, None]
            h = model.hidden_cached(toks, torch.tensor([[t], [50 + t]]), cache.main, attn_impl=attn_impl)
            assert ((model.head(h[0, 0]) - full[0, t]).abs().max() / full.abs().max()) < 1e-5, t


def test_attention_mode_is_an_argument_not_module_state():
    model = model_for("naive")
    Engine(model).generate(PROMPTS, SamplingParams(max_new_tokens=4, temperature=0))
    assert {m.attn_impl for m in model.modules() if hasattr(m, "attend_absorb")} == {"naive"}
    tokens = torch.tensor([PROMPTS[2]])
    pos = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        a = model.hidden_cached(tokens, pos, model.new_cache(1, 16).main, attn_impl="absorb")
        n = model.hidden_cached(tokens, pos, model.new_cache(1, 16).main, attn_impl="naive")
    assert torch.allclose(a, n, atol=1e-5) and torch.allclose(n, model.hidden(tokens), atol=1e-5)


def greedy_reference(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_generation_matches_full_forward_and_batching():
    model = model_for()
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    batch = engine.generate(PROMPTS, params)
    for prompt, g in zip(PROMPTS, batch):
        assert g.tokens == greedy_reference(model, prompt, 24)
        assert g.tokens == engine.generate([prompt], params)[0].tokens  # same result alone as in a batch
        assert g.finish_reason == "length" and len(g.logprobs) == 24 and all(lp == 0.0 for lp in g.logprobs)


def test_seeded_sampling_is_reproducible_and_batch_independent():
    engine = Engine(model_for())
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=5)
    a = engine.generate(PROMPTS, params, seeds=[1, 2, 3])
    b = [engine.generate([p], params, seeds=[s])[0] for p, s in zip(PROMPTS, [1, 2, 3])]
    assert [g.tokens for g in a] == [g.tokens for g in b]
    twice = engine.generate([PROMPTS[0]] * 2, params)  # the same prompt twice: different samples
    assert twice[0].tokens != twice[1].tokens
    assert all(lp <= 0 for g in a for lp in g.logprobs)


def test_greedy_speculative_equals_greedy():
    model = model_for()
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=30, temperature=0)
    prompts = PROMPTS + [PROMPTS[0]]  # a repeated prompt shares its prefill
    plain = engine.generate(prompts, params)
    spec = engine.generate(prompts, params, speculative=True)
    assert [g.tokens for g in spec] == [g.tokens for g in plain]
    assert spec.stats.drafted > 0 and plain.stats.drafted == 0
    assert spec.stats.tokens == plain.stats.tokens == 30 * len(prompts)


def test_speculative_acceptance_rule_preserves_the_target_distribution():
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.2])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    n = 40000
    drafts = torch.multinomial(q, n, replacement=True, generator=gen)
    for d in drafts.tolist():
        ok, residual = speculative_check(p, q, d, gen)
        counts[d if ok else int(torch.multinomial(residual, 1, generator=gen))] += 1
    assert torch.allclose(counts / n, p, atol=0.01)  # 4 standard errors at n = 40000


def test_filtered_probs():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.equal(filtered_probs(logits, SamplingParams(temperature=0)), torch.tensor([[1.0, 0, 0, 0]]))
    top2 = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert top2[0, 2:].sum() == 0 and torch.isclose(top2.sum(), torch.tensor(1.0))
    nucleus = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert (nucleus[0] > 0).tolist() == [True, True, False, False]


def _nucleus_by_sorting(probs, top_p):
    """row_probs' nucleus as first written: sort the whole vocabulary (stable), zero the tail, renormalise."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p[:, None]
    nucleus = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return nucleus / nucleus.sum(-1, keepdim=True)


def test_nucleus_without_a_full_sort_equals_sorting_bit_for_bit():
    from nanoseek.engine import nucleus_mask, nucleus_mask_reference, row_probs

    gen = torch.Generator().manual_seed(0)
    # bf16-rounded logits tie often, as a bf16 head's do; scales from peaked (nucleus of 1) to flat (no
    # candidate set holds the nucleus: the reference path), top-p from 0.3 to 0.999
    scale = torch.tensor([0.3, 1.0, 3.0, 8.0, 20.0]).repeat_interleave(40)[:, None]
    logits = (torch.randn(200, 4096, generator=gen) * scale).bfloat16().float()
    logits[::7, :3] = logits[::7, :3].amax(-1, keepdim=True) + 2  # tied favourites
    logits[3::7, 10:70] = 6.0  # a tie straddling the 64 candidates
    top_p = torch.tensor([0.3, 0.9, 0.95, 0.999]).repeat(50)
    probs = (logits / 0.6).softmax(-1)
    fast = nucleus_mask(probs, top_p)
    assert torch.equal(fast, nucleus_mask_reference(probs, top_p))
    kept = fast.sum(-1)
    assert (kept == 1).any() and (kept > 64).any()  # both paths ran
    assert torch.equal(nucleus_mask(probs, top_p, candidates=4096), nucleus_mask_reference(probs, top_p))
    # the two conditions of the fast path, each at its edge: 64 candidates holding 0.93 of the mass where the
    # nucleus ends inside a tie of 200 tokens (ids spread over the vocabulary), and candidates short of top_p
    edge = torch.randint(0, 3, (2, 4096), generator=gen) * 0.001 + 1e-4  # ~1,365 ties at the top value
    edge[0, torch.randperm(4096, generator=gen)[:20]] = 1.0
    edge[1, :64], edge[1, 64:] = torch.linspace(0.02, 0.005, 64), 5e-5
    edge = edge / edge.sum(-1, keepdim=True)
    tie = edge[0].unique()[-2]  # the nucleus ends 30 tokens into the tie; topk keeps 44 of its tokens
    edge_p = torch.stack([edge[0][edge[0] > tie].sum() + 30 * tie, torch.tensor(0.9)])
    assert torch.equal(nucleus_mask(edge, edge_p), nucleus_mask_reference(edge, edge_p))
    out = row_probs(logits, torch.full((200,), 0.6), torch.zeros(200, dtype=torch.long), top_p)
    assert torch.equal(out, _nucleus_by_sorting(probs, top_p))
    # rows without top-p (1.0) keep every token, in a batch where other rows use it
    mixed = torch.where(torch.arange(200) % 2 == 0, top_p, 1.0)
    out = row_probs(logits, torch.full((200,), 0.6), torch.zeros(200, dtype=torch.long), mixed)
    assert torch.equal(out[1::2], probs[1::2]) and torch.equal(out[::2], _nucleus_by_sorting(probs, top_p)[::2])


def test_top_k_keeps_the_k_largest_and_their_ties():
    from nanoseek.engine import row_probs

    logits = torch.tensor([[5.0, 4.0, 4.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    probs = row_probs(logits, torch.ones(2), torch.tensor([2, 0]), torch.ones(2))
    assert (probs[0] > 0).tolist() == [True, True, True, False, False]  # ties with the k-th stay, as before
    assert torch.equal(probs[1], logits[1].softmax(-1))


def test_cache_memory_is_the_formula():
    model = model_for()
    cache = model.new_cache(batch=4, max_len=50)
    cfg = model.cfg
    per_token = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # fp32
    assert cache.bytes_per_token() == per_token == kv_cache_bytes(cfg)["kv_cache_bytes_per_token"] * 2
    assert cache.kv.nbytes + cache.pe.nbytes == per_token * 4 * 50


def test_stop_conditions_and_bad_input():
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(["a b c d e f g", "ab cd ef gh abc bcd cde"] * 20, 300)
    engine = Engine(model_for(vocab_size=300), tok)
    out = engine.generate(["a b"], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert len(out.tokens) == 5 and isinstance(out.text, str) and out.finish_reason == "length"
    full = engine.generate(["a b"], SamplingParams(max_new_tokens=40, temperature=0))[0].text
    cut = next(i for i in range(1, len(full) - 1) if full[i:i + 2].isalnum())  # a stop string inside the text
    stop = full[cut:cut + 2]
    stopped = engine.generate(["a b"], SamplingParams(max_new_tokens=40, temperature=0, stop=[stop]))[0]
    # generation ends at the first occurrence; the stop string is kept (an R1 completion needs its "</answer>")
    assert stopped.finish_reason == "stop" and stopped.text == full[:full.index(stop) + len(stop)]
    assert len(stopped.tokens) < 40
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([""])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.generate([[1] * 120], SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="MTP"):
        Engine(model_for(n_mtp_layers=0)).generate([[1, 2]], SamplingParams(max_new_tokens=4), speculative=True)


# ----------------------------------------------------------------------------- continuous batching


def _tok_model():
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(["a b c d e f g", "the cat sat on the mat", "x y z 1 2 3"] * 20, 300)
    return model_for(vocab_size=300), tok


def _specs():
    """(prompt, params, seed) of requests with different sampling parameters, lengths and stop strings."""
    P = SamplingParams
    return [
        ([5, 6, 7, 8, 9], P(max_new_tokens=12, temperature=0), 0),
        ([11, 12], P(max_new_tokens=20, temperature=1.0, top_k=40), 1),
        ([20, 21, 22, 23, 24, 25, 26, 27, 28], P(max_new_tokens=7, temperature=0.8, top_p=0.9), 2),
        ([30, 31, 32], P(max_new_tokens=16, temperature=1.3, top_k=5, top_p=0.5), 3),
        ([5, 6, 7, 8, 9], P(max_new_tokens=9, temperature=1.0), 4),  # same prompt as the first, sampled
        ([40, 41], P(max_new_tokens=25, temperature=1.0, stop=["a", "e"]), 5),
    ]


def _run(batcher, reqs, joins=None, cancel_at=None):
    """Step until done; request i joins at step joins[i] (default 0); cancel_at = (request, step)."""
    joins = joins or [0] * len(reqs)
    step = 0
    while step <= max(joins) or batcher.busy:
        for r, j in zip(reqs, joins):
            if j == step:
                batcher.submit(r)
        if cancel_at and cancel_at[1] == step:
            cancel_at[0].cancel()
        batcher.step()
        step += 1
    return [r.tokens for r in reqs]


def test_continuous_batching_gives_each_request_its_own_tokens_in_any_interleaving():
    from nanoseek.engine import Batcher, Request

    model, tok = _tok_model()

    def fresh():
        return [Request(p, params, seed=s) for p, params, s in _specs()]

    alone = [_run(Batcher(model, tok, max_batch=1, max_len=64), [r])[0] for r in fresh()]
    assert alone[0] == greedy_reference(model, _specs()[0][0], 12)
    assert len({tuple(t) for t in alone}) == len(alone)
    distractor = Request([50, 51, 52], SamplingParams(max_new_tokens=40, temperature=1.0), seed=9)
    runs = [
        dict(max_batch=8),
        dict(max_batch=2),  # queueing: slots are reused by later requests
        dict(max_batch=3, joins=[0, 3, 3, 5, 8, 1]),  # requests join a running batch
        dict(max_batch=4, joins=[6, 0, 2, 0, 4, 1, 0], extra=distractor, cancel_at=(distractor, 5)),
    ]
    for run in runs:
        reqs = fresh() + ([run["extra"]] if "extra" in run else [])
        got = _run(Batcher(model, tok, max_batch=run["max_batch"], max_len=64), reqs, run.get("joins"),
                   run.get("cancel_at"))
        assert got[:len(alone)] == alone, run
    assert distractor.finish_reason == "cancelled" and 0 < len(distractor.tokens) < 40
    stopped = fresh()[5]
    _run(Batcher(model, tok, max_batch=1, max_len=64), [stopped])
    assert stopped.finish_reason in ("stop", "eos", "length")


def test_cancelled_request_frees_its_slot_at_the_next_step():
    from nanoseek.engine import Batcher, Request

    model, tok = _tok_model()
    b = Batcher(model, tok, max_batch=1, max_len=64)
    first, second = (Request([5, 6, 7], SamplingParams(max_new_tokens=50, temperature=1.0), seed=s) for s in (0, 1))
    seen = []
    first.listener = lambda r, token: seen.append(token)
    b.submit(first)
    b.submit(second)
    for _ in range(3):
        b.step()
    assert b.active == [first] and list(b.waiting) == [second] and len(first.tokens) == 4
    first.cancel()
    b.step()
    assert first.finish_reason == "cancelled" and len(first.tokens) == 4 and seen[-1] is None
    assert b.active == [second] and len(second.tokens) == 2  # admitted: first token + one decode step


def test_requests_leave_when_done_and_record_raw_logprobs():
    from nanoseek.engine import Batcher, Request

    model, tok = _tok_model()
    b = Batcher(model, tok, max_batch=4, max_len=64)
    reqs = [Request([5, 6, 7, 8], SamplingParams(max_new_tokens=n, temperature=0), top_logprobs=3) for n in (2, 5, 9)]
    for r in reqs:
        b.submit(r)
    sizes = []
    while b.busy:
        b.step()
        sizes.append(len(b.active))
    assert sizes == [3, 2, 2, 2, 1, 1, 1, 1, 0] and [len(r.tokens) for r in reqs] == [2, 5, 9]
    assert all(r.finish_reason == "length" for r in reqs)
    r = reqs[2]
    with torch.no_grad():
        logp = model(torch.tensor([r.prompt + r.tokens])).log_softmax(-1)[0, len(r.prompt) - 1:-1]
    chosen = logp.gather(1, torch.tensor(r.tokens)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(r.raw_logprobs), chosen, atol=1e-4)
    for t, top in zip(r.tokens, r.top):  # greedy: the chosen token is the most likely one
        assert len(top) == 3 and top[0][0] == t and top[0][1] >= top[1][1] >= top[2][1]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        b.submit(Request([1] * 60, SamplingParams(max_new_tokens=10)))


def test_row_probs_of_a_row_do_not_depend_on_the_other_rows():
    from nanoseek.engine import row_probs

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 3
    temperature, top_k = torch.tensor([0.0, 1.0, 0.7, 1.3]), torch.tensor([0, 0, 20, 5])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5])
    batch = row_probs(logits, temperature, top_k, top_p)
    for i in range(4):
        alone = row_probs(logits[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1])
        assert torch.equal(batch[i:i + 1], alone), i  # bit for bit
        params = SamplingParams(temperature=float(temperature[i]), top_k=int(top_k[i]), top_p=float(top_p[i]))
        assert torch.equal(filtered_probs(logits[i:i + 1], params), alone)
    assert (batch[2] > 0).sum() <= 20 and (batch[3] > 0).sum() <= 5
    assert torch.equal(batch[0], torch.eye(300)[logits[0].argmax()])


def test_greedy_rows_are_one_hot_whatever_their_filters():
    """temperature 0 is argmax: top-k and top-p (skipped for such rows) change nothing, alone or beside sampled rows."""
    from nanoseek.engine import row_probs

    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))  # flat: top-p would need a full sort
    probs = row_probs(logits, torch.tensor([0.0, 0.0, 1.0]), torch.tensor([5, 0, 0]), torch.tensor([0.5, 0.95, 0.9]))
    assert torch.equal(probs[:2], torch.eye(300)[logits[:2].argmax(-1)])
    assert (probs[2] > 0).sum() > 1
