"""GRPO's pure functions against hand-computed values, and one real update of the stage."""

import copy
import dataclasses
import inspect
import json
import math
import types

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import save_model
from nanoseek.losses import grpo_loss, group_advantages, k3_kl, process_advantages, token_logprobs
from nanoseek.stages.common import read_metrics
from nanoseek.engine import Engine, Generation
from nanoseek.rollouts import RolloutBatch, steps_of_tokens
from nanoseek.routing import RoutingHooks
from nanoseek.stages.grpo import (ALGOS, GRPOConfig, collect_rollouts, resolve_algo, rollout, run, train, update,
                                  warmup_lr)
from nanoseek.tasks import get_task, is_heldout, problem_key
from nanoseek.tasks.families import StartsWithTask
from nanoseek.template import r1_completion, r1_prompt
from nanoseek.tokenizer import Tokenizer


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    std = math.sqrt(1 / 3)  # Bessel: sum of squared deviations 4 × 0.25 over G − 1 = 3
    a = group_advantages(r)
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # all equal: no signal
    torch.testing.assert_close(group_advantages(r, scale="none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


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
    assert dataclasses.asdict(resolve_algo(cfg)) == {**ALGOS["dapo"], "eps_low": 0.2}
    cfg = GRPOConfig(init="x", task="chain_sum", out="y", algo="grpo", beta=0.0, loss_norm="token", eps_low=0.1)
    settings = resolve_algo(cfg)
    assert settings.beta == 0.0 and settings.loss_norm == "token" and settings.eps_low == 0.1
    assert settings.eps_high == ALGOS["grpo"]["eps_high"]  # not given: the algorithm's
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
    batch = RolloutBatch(prompts=prompts, completions=completions, rewards=torch.tensor([[1.0, 0.0, 0.5, 0.0]]),
                         pad=tok.pad_id)
    cfg = GRPOConfig(init="x", task="chain_sum", out="y", mu=2, micro_batch=3, lr=1e-3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    stats = update(model, None, opt, batch, cfg, dataclasses.replace(resolve_algo(cfg), beta=0.0))
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
    batch = RolloutBatch(prompts=[prompt] * 8, completions=[good, bad] * 4, rewards=torch.tensor([[1.0, 0.0] * 4]),
                         pad=tok.pad_id)

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


def test_process_advantages_by_hand():
    """DeepSeekMath §4.1.3: step rewards normalised over the group's steps; a token gets its step's and every later
    step's (to-go) or its own step's normalised reward."""
    rewards, steps = [[1.0, 1.0], [1.0, 0.0]], [[0, 0, 1], [0, 1]]
    # the group's steps 1, 1, 1, 0: mean 0.75, Bessel std 0.5, so a right step is +0.5 and a wrong one -1.5
    to_go = process_advantages(rewards, steps, group_size=2)
    own = process_advantages(rewards, steps, group_size=2, to_go=False)
    scale = 0.5 / (0.5 + 1e-4)
    torch.testing.assert_close(to_go[0], torch.tensor([1.0, 1.0, 0.5]) * scale)
    torch.testing.assert_close(to_go[1], torch.tensor([-1.0, -1.5]) * scale)
    torch.testing.assert_close(own[0], torch.tensor([0.5, 0.5, 0.5]) * scale)
    torch.testing.assert_close(own[1], torch.tensor([0.5, -1.5]) * scale)
    same = process_advantages([[1.0, 1.0], [1.0]], [[0, 1], [0]], group_size=2)
    assert all(torch.equal(a, torch.zeros_like(a)) for a in same)  # every step right: no signal


def test_each_token_belongs_to_the_step_its_first_character_is_in():
    text = ["ab", "c\n", "de", "\nf", "g"]  # steps end after "abc\n" (4) and "de\n" (7), then "fg" (9)
    decode = lambda ids: "".join(text[i] for i in ids)  # noqa: E731
    assert steps_of_tokens(decode, [0, 1, 2, 3, 4], [4, 7, 9]) == [0, 0, 1, 1, 2]
    assert steps_of_tokens(decode, [0, 1, 2, 3, 4], [4]) == [0, 0, 0, 0, 0]  # past the last step: the last step


def test_process_credit_raises_a_right_prefix_that_outcome_credit_leaves_alone(tiny_checkpoint):
    """Two samples share a right first step and differ in the second: the outcome advantage pushes the shared
    tokens up in one sample and down in the other (no net move); per-step credit pushes them up in both and the
    wrong step down."""
    from nanoseek import load

    prompt_text = r1_prompt("What is 2 + 3?")
    prefix, right, wrong = [17, 18, 19], [20, 21], [40, 41]

    def trained(process: str):
        model, tok = load(tiny_checkpoint)
        model.mtp.requires_grad_(False)
        prompt = tok.encode(prompt_text)
        batch = RolloutBatch(prompts=[prompt] * 4, completions=[prefix + right, prefix + wrong] * 2,
                             rewards=torch.tensor([[1.0, 0.0, 1.0, 0.0]]), pad=tok.pad_id,
                             step_rewards=[[1.0, 1.0], [1.0, 0.0]] * 2 if process != "off" else [],
                             token_steps=[[0, 0, 0, 1, 1]] * 4 if process != "off" else [])
        cfg = GRPOConfig(init="x", task="chain_sum", out="y", algo="dr-grpo", lr=1e-3, micro_batch=4,
                         group_size=4, process_reward=process)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        before = _logps(model, prompt, prefix + wrong)
        for _ in range(3):
            update(model, None, opt, batch, cfg, resolve_algo(cfg))
        return before, _logps(model, prompt, prefix + wrong)

    before, after = trained("step")
    assert after[:3].sum() > before[:3].sum() + 0.1 and after[3:].sum() < before[3:].sum() - 0.1
    before, after = trained("off")
    assert abs(after[:3].sum() - before[:3].sum()) < 0.5 * abs(after[3:].sum() - before[3:].sum())


def _logps(model, prompt, completion):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion[:-1]]))[0, len(prompt) - 1:]
        return logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_the_stage_takes_process_rewards_from_families_that_judge_steps(tiny_checkpoint, tmp_path):
    cfg = GRPOConfig(init=str(tiny_checkpoint), task="chain_sum", out=str(tmp_path / "rl"), steps=1,
                     prompts_per_step=2, group_size=3, max_new_tokens=12, eval_every=0, process_reward="to-go",
                     task_args={"max_terms": 2, "max_digits": 1})
    run(cfg)
    record = read_metrics(tmp_path / "rl" / "metrics.jsonl")[-1]
    assert 0 <= record["step_reward"] <= 1  # a random model writes no right line: the plumbing, not learning
    with pytest.raises(ValueError, match="judges outcomes only"):
        run(dataclasses.replace(cfg, task="countdown", task_args={}, out=str(tmp_path / "cd")))


# ----------------------------------------------------------------------------- correctness of the loop


def test_advantage_scaling_by_batch_keeps_small_differences_small():
    r = torch.tensor([[0.0, 0.1, 0.0, 0.1], [0.0, 1.0, 1.0, 0.0]])  # a format-only group and an accuracy group
    group, batch = group_advantages(r, "group"), group_advantages(r, "batch")
    assert group[0].abs().max().item() == pytest.approx(group[1].abs().max().item(), rel=0.01)  # full size (up to eps)
    assert batch[0].abs().max() < 0.2 * batch[1].abs().max()
    with pytest.raises(ValueError, match="group, batch or none"):
        group_advantages(r, "std-ish")


def test_truncated_importance_weights_scale_each_token():
    logp = torch.zeros(1, 2, requires_grad=True)
    w = torch.tensor([[2.0, 0.5]])
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), norm="token", is_weight=w)
    loss.backward()
    torch.testing.assert_close(logp.grad, -w / 2)


def test_warmup_does_not_depend_on_the_run_length():
    assert [warmup_lr(s, 1e-3, 4) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert warmup_lr(0, 1e-3, 0) == 1e-3
    assert "steps" not in inspect.signature(warmup_lr).parameters


def _batch_from_rollout(model, tok, temperature, rollout_model=None, n_prompts=2, G=4, new=6):
    task = get_task("chain_sum", max_terms=2, max_digits=1)
    cfg = GRPOConfig(init="x", task="chain_sum", out="y", group_size=G, max_new_tokens=new, temperature=temperature)
    batch = rollout(Engine(rollout_model or model, tok), task, task.problems(0, n_prompts), cfg, 0)
    batch.rewards = torch.tensor([[1.0, 0.0] * (G // 2)] * n_prompts)  # give every group a signal
    return batch, cfg


def test_the_update_scores_tokens_at_the_rollout_temperature(tiny_checkpoint):
    from nanoseek import load

    model, tok = load(tiny_checkpoint)
    batch, cfg = _batch_from_rollout(model, tok, temperature=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = update(model, None, opt, batch, cfg, resolve_algo(cfg))
    assert stats["logp_gap_abs_max"] < 1e-4 and stats["kl_rollout"] < 1e-6  # same distribution, same tokens
    off = update(model, None, opt, batch, dataclasses.replace(cfg, temperature=1.0), resolve_algo(cfg))
    assert off["logp_gap_abs_mean"] > 0.05  # scoring at T = 1 what was sampled at T = 0.5 is off-policy


def test_minibatches_make_the_clip_act(tiny_checkpoint):
    """One optimiser step per rollout batch is on-policy (ratio ≡ 1, clip_frac ≡ 0); split into minibatches, every
    step after the first trains on a policy one step old, so the ratio moves and the clip bounds it (R1: 16
    minibatches per rollout batch). The groups stay whole: a minibatch holds G consecutive rows per group."""
    from nanoseek import load
    from nanoseek.stages.grpo import _minibatches

    assert _minibatches(64, 8, 4, 16) == [[slice(0, 16)], [slice(16, 32)], [slice(32, 48)], [slice(48, 64)]]
    assert _minibatches(24, 8, 2, 8) == [[slice(0, 8), slice(8, 16)], [slice(16, 24)]]
    model, tok = load(tiny_checkpoint)
    model.mtp.requires_grad_(False)
    batch, cfg = _batch_from_rollout(model, tok, temperature=1.0, n_prompts=8, G=4, new=8)
    cfg = dataclasses.replace(cfg, lr=3e-2)
    state = copy.deepcopy(model.state_dict())
    one = update(model, None, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2),
                 batch, cfg, resolve_algo(cfg))
    assert one["optimizer_steps"] == 1 and one["clip_frac"] == 0 and one["ratio_max"] == one["ratio_min"] == 1
    model.load_state_dict(state)
    four = update(model, None, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2),
                  batch, dataclasses.replace(cfg, minibatches=4), resolve_algo(cfg))
    assert four["optimizer_steps"] == 4 and four["clip_frac"] > 0 and four["ratio_max"] > 1.2


@pytest.mark.parametrize("algo", list(ALGOS))
def test_kl_to_the_initial_policy_is_logged_for_every_algorithm(tiny_checkpoint, algo):
    from nanoseek import load

    model, tok = load(tiny_checkpoint)
    model.mtp.requires_grad_(False)
    reference = copy.deepcopy(model).requires_grad_(False)
    batch, cfg = _batch_from_rollout(model, tok, temperature=1.0)
    cfg = dataclasses.replace(cfg, algo=algo, lr=1e-2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = update(model, reference, opt, batch, cfg, resolve_algo(cfg))
    second = update(model, reference, opt, batch, cfg, resolve_algo(cfg))
    assert first["kl"] == 0.0 and second["kl"] > 1e-4


def test_grpo_prompts_are_fresh_training_problems_over_many_steps():
    """The stream GRPO draws from: 300 steps × 8 prompts, no question twice, none held out, none of what
    evaluation scores (by id and by canonical key)."""
    task = get_task("chain_sum", min_terms=2, max_terms=3, min_digits=1, max_digits=2)
    stream = task.stream(0, "train")
    steps = [stream.take(8) for _ in range(300)]
    keys = [problem_key(p.question) for step in steps for p in step]
    assert len(set(keys)) == len(keys) == 2400 and stream.repeats == 0
    held = task.problems(0, 200, split="heldout")
    assert not set(keys) & {problem_key(p.question) for p in held}
    assert not any(is_heldout(p.question) for step in steps for p in step)


def test_stage_logs_fresh_problems_lr_and_heldout_set(tiny_checkpoint, tmp_path):
    cfg = GRPOConfig(init=str(tiny_checkpoint), task="chain_sum", out=str(tmp_path / "rl"), steps=4,
                     prompts_per_step=3, group_size=2, max_new_tokens=4, eval_every=2, eval_n=5, warmup_steps=3,
                     lr=3e-4, task_args={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2})
    run(cfg)
    records = [r for r in read_metrics(tmp_path / "rl" / "metrics.jsonl") if r["step"] > 0]
    assert [r["lr"] for r in records] == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4])
    assert all("kl" in r and r["reference_s"] > 0 for r in records)  # β = 0.04 (grpo): every step
    ids = [i for r in records for i in r["problems"]]
    assert len(ids) == len(set(ids)) == 12 and all(r["problems_repeated"] == 0 for r in records)
    held = [json.loads(line) for line in (tmp_path / "rl" / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 5 and not {h["id"] for h in held} & set(ids)
    for key in ("kl", "kl_rollout", "logp_gap_abs_mean", "routing_mismatch", "frac_zero_std", "frac_format_only",
                "entropy", "clip_frac", "is_ratio_max", "reward_accuracy", "temperature", "heldout_cons"):
        assert key in records[-1], key
    # what the policy wrote: --log-samples (2) rollouts per step, of the step's own problems, with their reward
    samples = read_metrics(tmp_path / "rl" / "samples.jsonl")
    assert [r["step"] for r in samples] == [1, 1, 2, 2, 3, 3, 4, 4]
    for r in samples:
        assert r["problem"] in records[r["step"] - 1]["problems"] and r["question"] and isinstance(r["completion"], str)
        assert r["reward"] == r["accuracy"] in (0.0, 1.0)  # w_accuracy 1, w_format 0


def test_kl_every_spaces_out_the_reference_forward_when_beta_is_zero(tiny_checkpoint, tmp_path):
    cfg = GRPOConfig(init=str(tiny_checkpoint), task="chain_sum", out=str(tmp_path / "rl"), steps=4, algo="dr-grpo",
                     prompts_per_step=2, group_size=2, max_new_tokens=3, eval_every=0, kl_every=2,
                     task_args={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2})
    run(cfg)
    assert ["kl" in r for r in read_metrics(tmp_path / "rl" / "metrics.jsonl")] == [True, False, True, False]


class _ScriptedEngine:
    """Stands in for the engine: odd problems always get the same (wrong) text, even ones a mix."""

    def __init__(self, tok):
        self.tokenizer, self.model = tok, types.SimpleNamespace(layers=[])
        self.calls = 0

    def generate(self, prompts, params, seeds):
        self.calls += 1
        out = []
        for i, prompt in enumerate(prompts):
            n = int(prompt.split("(")[-1].rstrip(").")) if "(" in prompt else 0
            text = "x" if n % 2 else ("a" if i % 2 else "x")
            out.append(Generation(prompt_tokens=[1, 2], tokens=[3], logprobs=[-1.0], text=text, finish_reason="stop"))
        return out


def test_dynamic_sampling_draws_more_prompts_until_the_step_is_full(tiny_checkpoint):
    from nanoseek import load

    tok = load(tiny_checkpoint)[1]
    task = StartsWithTask("a")
    cfg = GRPOConfig(init="x", task="-", out="y", prompts_per_step=4, group_size=2, algo="dapo")
    engine = _ScriptedEngine(tok)
    batch, record = collect_rollouts(engine, task, task.stream(0, "train"), cfg, resolve_algo(cfg), 0)
    assert engine.calls == record["sampling_rounds"] >= 2 and batch.rewards.shape == (4, 2)
    assert (batch.rewards.std(dim=1) > 0).all() and record["kept_groups"] == 1.0
    assert len(batch.completions) == len(batch.scores) == 8 and len(batch.problem_ids) == len(batch.questions) == 4
    plain = dataclasses.replace(cfg, dynamic_sampling="off")
    batch, record = collect_rollouts(_ScriptedEngine(tok), task, task.stream(0, "train"), plain, resolve_algo(plain),
                                     0)
    assert record["sampling_rounds"] == 1 and 0 < record["frac_zero_std"] < 1


# ----------------------------------------------------------------------------- MoE routing: capture and replay


def test_captured_rollout_routing_matches_the_full_forward(tiny_checkpoint):
    """What the engine's gates chose while decoding, rebuilt per sequence, equals the routing a full forward
    over the same tokens computes (fp32, same weights: only near-ties may differ)."""
    from nanoseek import load

    model, tok = load(tiny_checkpoint)
    batch, _ = _batch_from_rollout(model, tok, temperature=1.0, n_prompts=3, G=3, new=8)
    routes = batch.routes
    assert routes is not None and len(routes) == 9
    agree = total = 0
    for p, c, r in zip(batch.prompts, batch.completions, routes):
        log = []
        with torch.no_grad():
            model.hidden(torch.tensor([p + c[:-1]]), router_log=log)
        full = torch.stack([idx for _, idx in log])  # (n_moe, T, K)
        assert full.shape == r.shape
        agree += (full.sort(-1)[0] == r.sort(-1)[0]).all(-1).sum().item()
        total += full.shape[0] * full.shape[1]
    assert agree / total > 0.99


def test_routing_replay_uses_the_given_experts_and_keeps_router_gradients(tiny_checkpoint):
    from nanoseek import load

    model, _ = load(tiny_checkpoint)
    tokens = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    log = []
    plain = model.hidden(tokens, router_log=log)
    own = torch.stack([idx.view(2, 10, -1) for _, idx in log], dim=1)  # (B, n_moe, T, K)
    with RoutingHooks(model, own, replay=True) as hooks:  # replaying its own choice changes nothing
        same = model.hidden(tokens)
    torch.testing.assert_close(same, plain)
    assert not torch.stack(hooks.mismatch).any()
    other = (own + 1) % model.cfg.n_routed_experts
    with RoutingHooks(model, other, replay=True) as hooks:
        log2 = []
        replayed = model.hidden(tokens, router_log=log2)
    assert torch.stack(hooks.mismatch).all() and not torch.allclose(replayed, plain)
    replayed.sum().backward()
    assert model.layers[1].ffn.gate.weight.grad.abs().sum() > 0


def test_bf16_rollouts_show_a_gap_and_replay_removes_the_routing_part(tiny_checkpoint):
    from nanoseek import load

    model, tok = load(tiny_checkpoint)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    # enough tokens for bf16 rounding to flip some expert choices (short prompts: 8 × 4 × ~50 positions)
    batch32, cfg = _batch_from_rollout(model, tok, temperature=1.0, n_prompts=8, G=4, new=30)
    fp32 = update(model, None, opt, batch32, cfg, resolve_algo(cfg))
    rollout16 = copy.deepcopy(model).to(torch.bfloat16)
    batch, cfg = _batch_from_rollout(model, tok, temperature=1.0, rollout_model=rollout16, n_prompts=8, G=4, new=30)
    plain = update(model, None, opt, batch, cfg, resolve_algo(cfg))
    replay = update(model, None, opt, batch, dataclasses.replace(cfg, routing_replay=True), resolve_algo(cfg))
    assert plain["logp_gap_abs_mean"] > 20 * fp32["logp_gap_abs_mean"]  # bf16 numerics: measured and logged
    assert fp32["routing_mismatch"] == 0 < plain["routing_mismatch"]
    assert replay["logp_gap_abs_mean"] <= plain["logp_gap_abs_mean"]
    # the mismatch is measured before replay replaces a gate's experts: at the first MoE layer (same input either
    # way) it is the same with and without replay; later layers see replayed experts' outputs, so theirs may differ
    from nanoseek.rollouts import pack_completions
    from nanoseek.routing import completion_logprobs_routed, pack_routes

    inputs, targets, mask = pack_completions(batch.prompts, batch.completions, batch.pad)
    routes = pack_routes(batch.routes, inputs.shape[1])
    with torch.no_grad():
        first_plain = completion_logprobs_routed(model, model, inputs, targets, mask, 1.0, routes, False)[2][0]
        first_replay = completion_logprobs_routed(model, model, inputs, targets, mask, 1.0, routes, True)[2][0]
    assert first_plain.any() and torch.equal(first_plain, first_replay)


# ----------------------------------------------------------------------------- the sanity ladder, first rung


@pytest.mark.parametrize("algo", list(ALGOS))
def test_sanity_ladder_grpo_drives_a_rare_behaviour_to_almost_always(tiny_checkpoint, tmp_path, algo):
    """A behaviour the model shows ~20% of the time, rewarded, reaches ≥ 95% within 50 steps (fixed seeds)."""
    from nanoseek import load

    model, tok = load(tiny_checkpoint)
    task = StartsWithTask.at_rate(model, tok, 0.2)
    assert 0.15 < task.base_rate < 0.25
    cfg = GRPOConfig(init="-", task="starts_with", out=str(tmp_path), steps=50, prompts_per_step=8, group_size=8,
                     max_new_tokens=1, lr=3e-3, eval_every=0, save_every=1000, algo=algo)
    train(model, tok, task, cfg, tmp_path)
    acc = [r["accuracy"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert sum(acc[:3]) / 3 < 0.3 and sum(acc[-5:]) / 5 >= 0.95, acc


# ----------------------------------------------------------------------------- resume and the progress bar

WALL_CLOCK = {"rollout_s", "rollout_tokens_per_s", "update_s", "reference_s"}  # timings, never reproducible


def _rl_args(ckpt, out, *extra):
    """A handful of tiny steps that exercise everything a checkpoint must carry: the optimizer, the sampling seeds,
    the problem stream, a refreshed reference (β > 0) and held-out evaluations between checkpoints."""
    return ["grpo", "--init", str(ckpt), "--task", "chain_sum", "--task-args", '{"max_terms": 2, "max_digits": 1}',
            "--out", str(out), "--steps", "6", "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens",
            "8", "--eval-every", "3", "--eval-n", "3", "--save-every", "2", "--ref-refresh", "3", "--warmup-steps",
            "2", "--lr", "1e-3", "--precision", "fp32", "--threads", "1", *extra]


def _reproducible(out):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in read_metrics(out / "metrics.jsonl")]


def test_kill_and_resume_continues_the_uninterrupted_run_exactly(tiny_checkpoint, tmp_path):
    """SIGKILL after a checkpoint (possibly mid-step or mid-save), then --resume: every logged value of every
    step and the final weights equal the uninterrupted run's, bit for bit."""
    from tests.killing import assert_resumed_like_uninterrupted, kill_after

    from nanoseek import checkpoint as ckpt
    from nanoseek.cli import main

    assert main(_rl_args(tiny_checkpoint, tmp_path / "a")) == 0
    kill_after(_rl_args(tiny_checkpoint, tmp_path / "b"), tmp_path / "b" / "checkpoints" / "step_000002")
    assert 2 <= int(ckpt.step_dirs(tmp_path / "b")[-1].name[5:]) < 6  # killed mid-run
    assert main(["grpo", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert _reproducible(tmp_path / "b") == _reproducible(tmp_path / "a")
    samples = [read_metrics(d / "samples.jsonl") for d in (tmp_path / "a", tmp_path / "b")]
    assert samples[0] == samples[1] and len(samples[0]) == 12  # 2 per step, none lost or repeated by the kill
    assert_resumed_like_uninterrupted(tmp_path / "a", tmp_path / "b", "step_000006")


def test_resume_refusals_and_a_finished_run(tiny_checkpoint, tmp_path, capsys):
    from nanoseek.cli import main

    out = tmp_path / "a"
    args = _rl_args(tiny_checkpoint, out)
    args[args.index("--steps") + 1] = "2"
    assert main(args) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["grpo", "--out", str(out), "--resume", "--force"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["grpo", "--out", str(out), "--resume", "--lr", "0.1"]) == 2
    assert "--lr 0.1 differs" in capsys.readouterr().err
    assert main(["grpo", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert main(["grpo", "--out", str(out), "--resume", "--steps", "2"]) == 0
    assert "nothing to do" in capsys.readouterr().err and (out / "metrics.jsonl").read_text() == before
    assert main(["grpo", "--out", str(out), "--resume", "--steps", "3"]) == 0  # a larger --steps extends it
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2, 3]


def _final_bar(err: str) -> str:
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("grpo")][-1]


def test_the_bar_reaches_the_last_step_and_shows_held_only_when_measured(tiny_checkpoint, tmp_path, capsys):
    cfg = GRPOConfig(init=str(tiny_checkpoint), task="chain_sum", out=str(tmp_path / "rl"), steps=3,
                     prompts_per_step=2, group_size=2, max_new_tokens=3, eval_every=0,
                     task_args={"max_terms": 2, "max_digits": 1})
    run(cfg)
    bar = _final_bar(capsys.readouterr().err)
    assert "3/3" in bar and "held" not in bar, bar


def test_a_time_limited_bar_shows_the_limit_not_the_step_ceiling(tiny_checkpoint, tmp_path, capsys):
    """--max-seconds with the default --steps 100000: the bar is the time limit's percentage, ending at 100%, and
    never 'N/100000' with an ETA of days."""
    cfg = GRPOConfig(init=str(tiny_checkpoint), task="chain_sum", out=str(tmp_path / "rl"), steps=100000,
                     max_seconds=1e-6, prompts_per_step=2, group_size=2, max_new_tokens=3, eval_every=0,
                     task_args={"max_terms": 2, "max_digits": 1})
    run(cfg)
    bar = _final_bar(capsys.readouterr().err)
    assert "100000" not in bar and "100%" in bar and "step=1" in bar, bar
