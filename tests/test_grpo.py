"""GRPO's pure functions against hand-computed values, and one real update of the stage."""

import math

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import save_model
from nanoseek.losses import grpo_loss, group_advantages, k3_kl, token_logprobs
from nanoseek.stages.common import read_metrics
from nanoseek.stages.grpo import ALGOS, GRPOConfig, resolve_algo, run, update
from nanoseek.template import r1_completion, r1_prompt
from nanoseek.tokenizer import Tokenizer


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    std = math.sqrt(1 / 3)  # Bessel: sum of squared deviations 4 × 0.25 over G − 1 = 3
    a = group_advantages(r)
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # all equal: no signal
    torch.testing.assert_close(group_advantages(r, scale_by_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_grpo_loss_normalisations_by_hand():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    # on-policy (ratio 1): per-token loss is −A
    seq, _ = grpo_loss(logp, logp.detach(), adv, mask, norm="sequence")
    assert seq.item() == pytest.approx(((-1 - 1) / 2 + 2 / 1) / 2)  # mean over responses of their token means
    tok, _ = grpo_loss(logp, logp.detach(), adv, mask, norm="token")
    assert tok.item() == pytest.approx((-1 - 1 + 2) / 3)
    const, _ = grpo_loss(logp, logp.detach(), adv, mask, norm="constant", max_len=4)
    assert const.item() == pytest.approx((-1 - 1 + 2) / (2 * 4))
    tok.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3, 0], [2 / 3, 0, 0]]))


def test_clipping_stops_the_gradient_and_is_counted():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, stats = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.28, norm="token")
    assert loss.item() == pytest.approx(-(1.28 + 1.1) / 2)  # the first ratio is clipped at 1 + eps_high
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0 and stats["clip_frac"] == 0.5


def test_k3_kl_is_non_negative_and_zero_for_equal_policies():
    a, b = torch.randn(1000), torch.randn(1000)
    assert (k3_kl(a, b) >= 0).all() and torch.equal(k3_kl(a, a), torch.zeros(1000))
    _, stats = grpo_loss(a[None], a[None], torch.ones(1), torch.ones(1, 1000), beta=0.1, ref_logp=b[None])
    assert stats["kl"] == pytest.approx(k3_kl(a, b).mean().item(), rel=1e-5)


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [10.0, -10.0]]])
    logp, ent = token_logprobs(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.5), 0.0]]), atol=1e-6, rtol=0)
    assert ent[0, 0].item() == pytest.approx(math.log(2)) and ent[0, 1].item() < 1e-6


def test_algorithm_presets_and_overrides():
    cfg = GRPOConfig(init="x", task="chain_sum", out="y", algo="dapo")
    assert resolve_algo(cfg) == ALGOS["dapo"]
    cfg = GRPOConfig(init="x", task="chain_sum", out="y", algo="grpo", beta=0.0, loss_norm="token")
    assert resolve_algo(cfg)["beta"] == 0.0 and resolve_algo(cfg)["loss_norm"] == "token"
    with pytest.raises(ValueError, match="--algo"):
        resolve_algo(GRPOConfig(init="x", task="chain_sum", out="y", algo="ppo"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model with a tokenizer that knows the R1 template (no pretraining needed for these tests)."""
    texts = [r1_prompt(f"What is {a} + {b}?") + r1_completion(f"{a}+{b}={a + b}", str(a + b))
             for a in range(10) for b in range(10)]
    tok = Tokenizer.train(texts, 300)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tok.save(path.parent / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256))
    model.init_weights(std=0.02)
    save_model(model, path, tokenizer_file=path.parent / "tokenizer.json")
    return path


def test_one_update_changes_every_trainable_parameter(tiny_checkpoint):
    from nanoseek import load

    model, tok = load(tiny_checkpoint)
    model.mtp.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    prompts = [tok.encode(r1_prompt("What is 2 + 3?"))] * 4
    completions = [torch.randint(0, tok.vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 3, 7)]
    batch = {"prompts": prompts, "completions": completions, "rewards": torch.tensor([[1.0, 0.0, 0.5, 0.0]]),
             "pad": tok.pad_id}
    cfg = GRPOConfig(init="x", task="chain_sum", out="y", mu=2, micro_batch=3, lr=1e-3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    stats = update(model, None, opt, batch, cfg, {**resolve_algo(cfg), "beta": 0.0})
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, unchanged
    assert stats["grad_norm"] > 0 and 0 <= stats["clip_frac"] <= 1


def test_grpo_stage_runs_and_logs(tiny_checkpoint, tmp_path):
    cfg = GRPOConfig(init=str(tiny_checkpoint), task="chain_sum", out=str(tmp_path / "rl"), steps=2,
                     prompts_per_step=2, group_size=3, max_new_tokens=12, eval_every=1, eval_n=4, algo="grpo",
                     task_args={"max_terms": 2, "max_digits": 1})
    path = run(cfg)
    assert path.name == "step_000002"
    records = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2] and "heldout_accuracy" in records[0]
    for key in ("reward", "reward_accuracy", "reward_format", "accuracy", "response_len", "response_len_max",
                "kl", "clip_frac", "entropy", "rollout_tokens_per_s", "frac_zero_std", "heldout_accuracy"):
        assert key in records[-1], key


def test_updates_move_probability_toward_rewarded_completions(tiny_checkpoint):
    """The sign and plumbing of the whole update: rewarded completions become likelier, the others less."""
    from nanoseek import load

    model, tok = load(tiny_checkpoint)
    model.mtp.requires_grad_(False)
    prompt = tok.encode(r1_prompt("What is 2 + 3?"))
    good, bad = [17, 18, 19], [40, 41, 42]
    batch = {"prompts": [prompt] * 8, "completions": [good, bad] * 4,
             "rewards": torch.tensor([[1.0, 0.0] * 4]), "pad": tok.pad_id}

    def logp(completion):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion[:-1]]))[0, len(prompt) - 1:]
            return logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).sum().item()

    before = logp(good), logp(bad)
    cfg = GRPOConfig(init="x", task="chain_sum", out="y", algo="dr-grpo", lr=1e-3, micro_batch=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        update(model, None, opt, batch, cfg, resolve_algo(cfg))
    after = logp(good), logp(bad)
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1
