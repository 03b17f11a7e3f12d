"""The pretraining stage: kill-and-resume exactness, balancing, schedules, bad input and faults."""

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanoseek import checkpoint as ckpt
from nanoseek.cli import main
from nanoseek.losses import balance_loss
from nanoseek.optim import batch_size_at, lr_at, max_violation, mtp_lambda_at, update_routing_bias
from nanoseek.stages.common import read_metrics
from nanoseek.stages.pretrain import NonFiniteError, PretrainConfig, run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small deterministic text corpus (hermetic: no package data, no network)."""
    r = random.Random(0)
    words = ("the cat sat on a mat and a dog ran to the big red house under the blue sky with a green tree near "
             "the old river while two birds sang").split()
    docs = [" ".join(r.choice(words) for _ in range(r.randint(20, 90))) + "." for _ in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(docs))
    return path


def tiny_args(corpus, out, steps=24, extra=()):
    """Precision pinned: these runs test fp32 on every host (`auto` trains in bf16 on a CPU with native bf16;
    tests/test_precision.py covers bf16)."""
    return ["pretrain", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--steps", str(steps),
            "--batch-size", "8", "--micro-batch", "4", "--seq-len", "32", "--save-every", "4", "--eval-every", "8",
            "--eval-batches", "2", "--precision", "fp32", "--out", str(out), *extra]


def losses(out):
    return [(r["step"], r["loss"], r.get("mtp_loss"), r.get("balance_loss"), r["grad_norm"], r.get("heldout_loss"))
            for r in read_metrics(out / "metrics.jsonl")]


def test_kill_and_resume_is_bit_identical(corpus, tmp_path):
    """SIGKILL mid-run (possibly mid-checkpoint), then --resume: the same loss sequence, bit for bit."""
    assert main(tiny_args(corpus, tmp_path / "a")) == 0
    reference = losses(tmp_path / "a")
    cmd = [sys.executable, "-m", "nanoseek", *tiny_args(corpus, tmp_path / "b")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 11):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(ckpt.step_dirs(tmp_path / "b")) >= 1
    assert main(["pretrain", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert losses(tmp_path / "b") == reference


def test_resume_after_every_checkpoint(corpus, tmp_path):
    """Resuming from each saved step gives the uninterrupted tail (same for in-process runs)."""
    cfg = PretrainConfig(out=str(tmp_path / "a"), preset="tiny", data=[str(corpus)], vocab_size=300, steps=12,
                         batch_size=4, seq_len=32, save_every=3, keep=10, eval_every=6, eval_batches=1)
    run(cfg)
    reference = losses(tmp_path / "a")
    for stop in (3, 6, 9):
        out = tmp_path / f"r{stop}"
        run(dataclasses.replace(cfg, out=str(out)))
        for d in ckpt.step_dirs(out):  # pretend the run died right after step `stop`
            if int(d.name[5:]) > stop:
                shutil.rmtree(d)
        run(PretrainConfig.resume_of(str(out)))
        assert losses(out) == reference


def test_resume_rejects_a_different_setting(corpus, tmp_path):
    assert main(tiny_args(corpus, tmp_path / "a", steps=4)) == 0
    assert main(["pretrain", "--out", str(tmp_path / "a"), "--resume", "--lr", "0.1"]) == 2
    assert main(tiny_args(corpus, tmp_path / "a", steps=4)) == 2  # existing checkpoints, no --resume


def test_damaged_checkpoint_is_named(corpus, tmp_path, capsys):
    assert main(tiny_args(corpus, tmp_path / "a", steps=8)) == 0
    latest = ckpt.step_dirs(tmp_path / "a")[-1]
    data = bytearray((latest / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (latest / "model.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["pretrain", "--out", str(tmp_path / "a"), "--resume"]) == 2
    assert "model.safetensors: damaged" in capsys.readouterr().err


def test_failed_checkpoint_write_keeps_previous(corpus, tmp_path, monkeypatch):
    import nanoseek.stages.pretrain as stage

    cfg = PretrainConfig(out=str(tmp_path / "a"), preset="tiny", data=[str(corpus)], vocab_size=300, steps=8,
                         batch_size=4, seq_len=32, save_every=4, eval_every=0, eval_batches=1)
    real = ckpt.write_model_files
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage.ckpt, "write_model_files", failing)
    with pytest.raises(OSError):
        run(cfg)
    dirs = ckpt.step_dirs(tmp_path / "a")
    assert [d.name for d in dirs] == ["step_000004"]
    ckpt.verify(dirs[0])
    assert not [p for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_non_finite_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch):
    import nanoseek.stages.pretrain as stage

    real = stage._Trainer._losses

    def poisoned(self, batch, step):
        out = real(self, batch, step)
        if step >= 2:
            return (out[0] * float("nan"),) + out[1:]
        return out

    monkeypatch.setattr(stage._Trainer, "_losses", poisoned)
    cfg = PretrainConfig(out=str(tmp_path / "a"), preset="tiny", data=[str(corpus)], vocab_size=300, steps=20,
                         batch_size=4, seq_len=32, save_every=1, keep=10, eval_every=0, max_bad_steps=3)
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteError, match="3 non-finite"):
        run(cfg)
    dirs = ckpt.step_dirs(tmp_path / "a")
    assert dirs[-1].name == "step_000004"  # the third bad step (5) stops the run before any save
    good, after_skips = ckpt.load_model(dirs[1]), ckpt.load_model(dirs[-1])  # steps 2 and 4
    for a, b in zip(good.state_dict().values(), after_skips.state_dict().values()):
        assert torch.equal(a, b)  # skipped steps leave weights and routing biases untouched


def test_bad_data_paths_exit_2(corpus, tmp_path, capsys):
    assert main(tiny_args(tmp_path / "missing-*.txt", tmp_path / "a")) == 2
    assert "missing-*.txt" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(tiny_args(tmp_path / "empty.txt", tmp_path / "b")) == 2
    (tmp_path / "small.txt").write_text("just a few words\n\nand another few")
    assert main(tiny_args(tmp_path / "small.txt", tmp_path / "c")) == 2
    assert "too small" in capsys.readouterr().err


def test_balance_modes_and_metrics(corpus, tmp_path):
    records = {}
    for mode in ("aux-free", "aux-loss", "none"):
        out = tmp_path / mode
        assert main(tiny_args(corpus, out, steps=6, extra=("--balance", mode))) == 0
        records[mode] = read_metrics(out / "metrics.jsonl")
        model = ckpt.load_model(out)
        bias = model.layers[1].ffn.gate.bias
        assert (bias.abs().sum() > 0) == (mode == "aux-free")  # only aux-free moves the routing bias
    last = records["aux-free"][-1]
    for key in ("loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "maxvio",
                "maxvio_layer1", "maxvio_layer2", "heldout_loss", "heldout_maxvio"):
        assert key in last and last[key] == last[key], key
    assert "balance_loss" not in records["none"][-1]


def test_lr_schedule_shape():
    peak, total = 1.0, 1000
    lrs = [lr_at(s, total, peak, warmup=0.02, decay_start=0.6, decay_end=0.9, min_ratio=0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(1 / 20) and lrs[19] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[20:600])
    assert all(a >= b for a, b in zip(lrs[600:900], lrs[601:900]))
    assert lrs[750] == pytest.approx(0.55, abs=0.01) and all(v == pytest.approx(0.1) for v in lrs[900:])
    # the warm-up never exceeds the peak, whatever the rounding of warmup × total (160 × 2% = 3.2 steps)
    short = [lr_at(s, 160, peak, warmup=0.02) for s in range(10)]
    assert short[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and max(short) == 1.0
    assert lr_at(0, 10, peak, warmup=0.0) == 1.0
    assert mtp_lambda_at(0, 100) == 0.3 and mtp_lambda_at(99, 100) == 0.1
    assert batch_size_at(0, 100, 16, start=4, ramp=0.5) == 4 and batch_size_at(25, 100, 16, 4, 0.5) == 10
    assert batch_size_at(60, 100, 16, 4, 0.5) == 16


def test_bias_update_and_maxvio():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 30.0, 20.0, 20.0])
    update_routing_bias([bias], [load], 0.001)
    assert torch.equal(bias, torch.tensor([0.001, -0.001, 0.0, 0.0]))
    assert max_violation(load) == pytest.approx(0.5)


def test_balance_loss_is_one_when_balanced_and_grows_with_imbalance():
    E, K, T = 4, 2, 8
    balanced_idx = torch.tensor([[0, 1], [2, 3]] * (T // 2))
    uniform = torch.full((T, E), 0.5)
    assert balance_loss(uniform, balanced_idx, n_seq=1).item() == pytest.approx(1.0)
    skewed_idx = torch.tensor([[0, 1]] * T)
    skewed = torch.tensor([[0.9, 0.9, 0.1, 0.1]] * T)
    assert balance_loss(skewed, skewed_idx, n_seq=1).item() > 1.5
    two_seqs = torch.cat([balanced_idx, skewed_idx])
    per_seq = balance_loss(torch.cat([uniform, skewed]), two_seqs, n_seq=2, per_sequence=True)
    assert per_seq.item() == pytest.approx((1.0 + balance_loss(skewed, skewed_idx, 1).item()) / 2)


def test_ctrl_c_saves_then_resume_gives_the_uninterrupted_run(corpus, tmp_path):
    """SIGINT: the stage finishes its step, saves it, prints one line and exits 130; --resume continues exactly."""
    assert main(tiny_args(corpus, tmp_path / "a", steps=16)) == 0
    reference = losses(tmp_path / "a")
    cmd = [sys.executable, "-m", "nanoseek", *tiny_args(corpus, tmp_path / "b", steps=16, extra=["--save-every", "100"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300  # a safety net for a hung child, not a speed bound
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert proc.returncode == 130 and "Traceback" not in err
    assert "interrupted after step" in last and "--resume" in last
    done = int(ckpt.step_dirs(tmp_path / "b")[-1].name[5:])
    assert 3 <= done < 16  # saved at the step it stopped on, not at a --save-every boundary
    assert main(["pretrain", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert losses(tmp_path / "b") == reference


def test_resume_with_more_steps_extends_even_when_equal_to_the_default(corpus, tmp_path, capsys):
    assert main(tiny_args(corpus, tmp_path / "a", steps=4)) == 0
    # 300 is the flag's default: an explicit --steps 300 must still extend the 4-step run, not be ignored
    cfg = PretrainConfig.from_cli({"out": str(tmp_path / "a"), "resume": True, "steps": 300})
    assert cfg.steps == 300 and cfg.preset == "tiny" and "extending the run from 4 to 300" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "a"), "--resume", "--steps", "2"]) == 2  # fewer than done
    assert main(["pretrain", "--out", str(tmp_path / "a"), "--resume", "--steps", "6"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_force_replaces_an_earlier_run_and_never_a_foreign_directory(corpus, tmp_path):
    assert main(tiny_args(corpus, tmp_path / "a", steps=4)) == 0
    assert main(tiny_args(corpus, tmp_path / "a", steps=2)) == 2  # an earlier run, no --resume/--force
    assert main(tiny_args(corpus, tmp_path / "a", steps=2, extra=["--force"])) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")] == [1, 2]  # not appended
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(tiny_args(corpus, tmp_path / "mine", steps=2, extra=["--force"])) == 2
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_run_given_another_runs_tokenizer_reuses_its_token_streams(tmp_path, monkeypatch):
    """A distillation student (`--tokenizer` of the teacher, same corpus) copies the teacher's cached streams
    instead of rebuilding the corpus; a tokenizer with other content is not taken for it."""
    import numpy as np

    from nanoseek.stages import pretrain_data
    from nanoseek.tokenizer import Tokenizer

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    docs = {"train": [f"the quick brown fox jumps over {i} lazy dogs" for i in range(300)], "heldout": ["a dog"]}
    builds = []
    monkeypatch.setattr(pretrain_data, "_split_documents", lambda cfg: builds.append(cfg.tokenizer) or docs)
    teacher = PretrainConfig(out=str(tmp_path / "t"), preset="tiny", vocab_size=300)
    _, train, _ = pretrain_data.prepare_data(teacher, tmp_path / "t")
    student = dataclasses.replace(teacher, out=str(tmp_path / "s"), tokenizer=str(tmp_path / "t/data/tokenizer.json"))
    _, train_s, _ = pretrain_data.prepare_data(student, tmp_path / "s")
    assert builds == [""] and np.array_equal(train, train_s)
    other = tmp_path / "other.json"
    Tokenizer.train([d.upper() for d in docs["train"]], 300).save(other)
    _, train_o, _ = pretrain_data.prepare_data(dataclasses.replace(student, out=str(tmp_path / "o"),
                                                                   tokenizer=str(other)), tmp_path / "o")
    assert builds == ["", str(other)] and not np.array_equal(train, train_o)


def test_heldout_loss_does_not_depend_on_micro_batches(corpus, tmp_path):
    """The held-out set is --batch-size rows per batch whatever --micro-batch is: the same tokens are scored
    (micro-batching changes only the last bits of training), so the held-out losses agree."""
    runs = {}
    for micro in (0, 2):
        out = tmp_path / f"m{micro}"
        run(PretrainConfig(out=str(out), preset="tiny", data=[str(corpus)], vocab_size=300, steps=1, batch_size=8,
                           micro_batch=micro, seq_len=32, eval_batches=2, precision="fp32"))
        runs[micro] = read_metrics(out / "metrics.jsonl")[-1]["heldout_loss"]
    assert runs[2] == pytest.approx(runs[0], rel=1e-5)
