"""On-policy distillation (reverse KL on the student's own samples), its exact --resume, equal-compute budgets
(--max-flops), and the error bars every speedrun score and comparison carries."""

import json
import math

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import save_model
from nanoseek.evaluation import paired_difference, pass1_se
from nanoseek.losses import reverse_kl
from nanoseek.stages.common import read_metrics
from nanoseek.stages.distill import DistillConfig
from nanoseek.stages.distill import run as distill
from nanoseek.stages.grpo import GRPOConfig
from nanoseek.stages.grpo import run as grpo
from nanoseek.stages.sft import SFTConfig
from nanoseek.stages.sft import run as sft
from nanoseek.template import r1_completion, r1_prompt
from nanoseek.tokenizer import Tokenizer

TASK = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
CHAIN = "State the final answer to the following arithmetic problem: {} + {} ="


# ----------------------------------------------------------------------------- the loss


def test_reverse_kl_is_the_exact_kl_of_the_student_from_the_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    ps, pt = s.softmax(-1), t.softmax(-1)
    expected = (ps * (ps.log() - pt.log())).sum(-1)
    assert torch.allclose(reverse_kl(s, t), expected, atol=1e-6)
    assert torch.allclose(reverse_kl(t, t), torch.zeros(5), atol=1e-6)
    assert not torch.allclose(reverse_kl(s, t), reverse_kl(t, s))  # not symmetric: the student's mass weighs it
    s.requires_grad_(True)
    reverse_kl(s, t).sum().backward()
    assert s.grad.abs().sum() > 0  # the gradient reaches the student (the teacher is a constant)


# ----------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tokenizer over chain_sum text, a teacher taught two-term sums by SFT, and an untrained student."""
    root = tmp_path_factory.mktemp("distill")
    rows = [{"prompt": r1_prompt(CHAIN.format(a, b)),
             "completion": r1_completion(f"{a} + {b} = {a + b}.", str(a + b))} for a in range(10) for b in range(10)]
    tok = Tokenizer.train([r["prompt"] + r["completion"] for r in rows], 300)
    tok.save(root / "tokenizer.json")
    (root / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    for name in ("teacher0", "student"):
        model = Transformer(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256, n_mtp_layers=0))
        save_model(model, root / name, tokenizer_file=root / "tokenizer.json")
    sft(SFTConfig(init=str(root / "teacher0"), data=[str(root / "traces.jsonl")], out=str(root / "teacher"),
                  epochs=6, batch_size=1, lr=3e-3, keep_heldout=True, threads=1))
    return root


def test_on_policy_distillation_pulls_the_student_to_the_teacher(models, tmp_path):
    distill(DistillConfig(init=str(models / "student"), teacher=str(models / "teacher"), task="chain_sum",
                          task_args=TASK, out=str(tmp_path / "d"), steps=30, prompts_per_step=8, samples=2,
                          max_new_tokens=24, lr=3e-3, threads=1))
    records = read_metrics(tmp_path / "d" / "metrics.jsonl")
    kl = [r["loss"] for r in records]
    assert len(records) == 30 and sum(kl[-5:]) / 5 < 0.5 * sum(kl[:5]) / 5, kl
    assert all(r["flops"] > 0 and r["teacher_flops"] > 0 for r in records)
    assert records[-1]["flops_total"] == pytest.approx(sum(r["flops"] for r in records))
    # every step's prompts are fresh training-split problems
    ids = [i for r in records for i in r["problems"]]
    assert len(ids) == len(set(ids)) or len(set(ids)) >= 90  # the 2-term space has ~90 training questions


def test_distill_refuses_a_teacher_with_another_tokenizer(models, tmp_path):
    other = Tokenizer.train(["completely different text " * 20, "zebra yak xylophone"], 280)
    other.save(tmp_path / "tok.json")
    model = Transformer(get_preset("tiny", vocab_size=other.vocab_size, max_seq_len=256, n_mtp_layers=0))
    save_model(model, tmp_path / "t", tokenizer_file=tmp_path / "tok.json")
    with pytest.raises(ValueError, match="tokenizer differs"):
        distill(DistillConfig(init=str(models / "student"), teacher=str(tmp_path / "t"), task="chain_sum",
                              task_args=TASK, out=str(tmp_path / "d"), steps=1, threads=1))


def test_max_flops_gives_each_arm_the_same_compute(models, tmp_path):
    """SFT spends exactly its budget (its schedule spans it), GRPO and on-policy distillation stop at the first step
    that reaches it: the speedrun's student arms are compared at equal compute."""
    budget = 2e9  # ~5 SFT steps of 2 rows
    few = tmp_path / "few.jsonl"  # 3 steps per epoch: the budget needs two epochs
    few.write_text("".join((models / "traces.jsonl").read_text().splitlines(keepends=True)[:6]))
    sft(SFTConfig(init=str(models / "student"), data=[str(few)], out=str(tmp_path / "s"),
                  epochs=1, batch_size=2, lr=1e-3, max_flops=budget, warmup_steps=0, keep_heldout=True, threads=1))
    s = read_metrics(tmp_path / "s" / "metrics.jsonl")
    per_step = s[0]["flops_total"]
    assert budget <= s[-1]["flops_total"] < budget + per_step
    assert s[-1]["epoch"] > 1  # the budget, not --epochs, decided the length
    lrs = [r["lr"] for r in s]  # the cosine spans the budget: it falls from the peak to near its floor
    assert lrs[0] == 1e-3 and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.5e-3
    grpo(GRPOConfig(init=str(models / "student"), task="chain_sum", task_args=TASK, out=str(tmp_path / "g"),
                    steps=1000, prompts_per_step=2, group_size=2, max_new_tokens=8, eval_every=0, max_flops=budget,
                    threads=1))
    g = read_metrics(tmp_path / "g" / "metrics.jsonl")
    assert g[-1]["flops_total"] >= budget > g[-2]["flops_total"]
    distill(DistillConfig(init=str(models / "student"), teacher=str(models / "teacher"), task="chain_sum",
                          task_args=TASK, out=str(tmp_path / "d"), steps=1000, prompts_per_step=2, samples=1,
                          max_new_tokens=8, max_flops=budget, threads=1))
    d = read_metrics(tmp_path / "d" / "metrics.jsonl")
    assert d[-1]["flops_total"] >= budget > d[-2]["flops_total"]


def _distill_args(models, out, *extra):
    """A handful of tiny steps that exercise what a checkpoint must carry: the optimizer (through its warm-up), the
    sampling seeds, the problem stream, the FLOPs counted."""
    return ["distill", "--init", str(models / "student"), "--teacher", str(models / "teacher"), "--task", "chain_sum",
            "--task-args", json.dumps(TASK), "--out", str(out), "--steps", "6", "--prompts-per-step", "2",
            "--samples", "2", "--max-new-tokens", "8", "--save-every", "2", "--warmup-steps", "3", "--lr", "1e-3",
            "--precision", "fp32", "--threads", "1", *extra]


WALL_CLOCK = {"rollout_s", "step_s"}  # timings, never reproducible


def _reproducible(out):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in read_metrics(out / "metrics.jsonl")]


def test_kill_and_resume_continues_the_uninterrupted_run_exactly(models, tmp_path, capsys):
    """SIGKILL after a checkpoint (possibly mid-step or mid-save), then --resume: every logged value of every step
    and the final weights equal the uninterrupted run's, bit for bit; a larger --steps extends the finished run."""
    from tests.killing import assert_resumed_like_uninterrupted, kill_after

    from nanoseek import checkpoint as ckpt
    from nanoseek.cli import main

    assert main(_distill_args(models, tmp_path / "a")) == 0
    kill_after(_distill_args(models, tmp_path / "b"), tmp_path / "b" / "checkpoints" / "step_000002")
    assert 2 <= int(ckpt.step_dirs(tmp_path / "b")[-1].name[5:]) < 6  # killed mid-run
    assert main(["distill", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert _reproducible(tmp_path / "b") == _reproducible(tmp_path / "a")
    assert_resumed_like_uninterrupted(tmp_path / "a", tmp_path / "b", "step_000006")
    capsys.readouterr()
    assert main(["distill", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main(["distill", "--out", str(tmp_path / "b"), "--resume", "--force"]) == 2
    assert main(["distill", "--out", str(tmp_path / "b"), "--resume", "--lr", "0.1"]) == 2
    assert "--lr 0.1 differs" in capsys.readouterr().err
    assert main(["distill", "--out", str(tmp_path / "b"), "--resume", "--steps", "7"]) == 0  # the run goes on
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 8))


# ----------------------------------------------------------------------------- error bars


def _problems(correct: list[list[bool]], prefix: str = "p") -> list[dict]:
    return [{"id": f"{prefix}{i}", "correct": c} for i, c in enumerate(correct)]


def test_pass1_standard_error_is_clustered_by_problem():
    """Four identical samples per problem are one observation, not four: the clustered SE is the sd of the
    per-problem means over √n, twice the naive binomial SE here."""
    problems = _problems([[True] * 4] * 50 + [[False] * 4] * 50)
    naive = math.sqrt(0.5 * 0.5 / 400)
    assert pass1_se(problems) == pytest.approx(math.sqrt(0.25 * 100 / 99 / 100))
    assert pass1_se(problems) == pytest.approx(2 * naive, rel=0.01)
    assert math.isnan(pass1_se(_problems([[True]])))


def test_paired_difference_and_its_interval():
    a = _problems([[True, True]] * 30 + [[False, False]] * 70)
    b = _problems([[True, False]] * 30 + [[False, False]] * 70)  # a is right where b is half right
    d = paired_difference(a, b, "a", "b")
    assert d["diff"] == pytest.approx(0.15) and d["n"] == 100 and (d["a"], d["b"]) == ("a", "b")
    se = math.sqrt(sum((x - 0.15) ** 2 for x in [0.5] * 30 + [0.0] * 70) / 99 / 100)
    assert d["se"] == pytest.approx(se) and d["ci_low"] == pytest.approx(0.15 - 1.959964 * se)
    assert d["ci_low"] > 0  # significant
    same = paired_difference(a, a)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0
    with pytest.raises(ValueError, match="different problems"):
        paired_difference(a, _problems([[True]] * 100, prefix="q"))
