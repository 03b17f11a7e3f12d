"""--tensorboard: every numeric scalar of metrics.jsonl mirrored as TensorBoard events with its step (read back with
TensorBoard's own EventAccumulator), a resumed run's re-logged steps replacing those a killed run logged past its
checkpoint, and a missing tensorboard package refused at the start of a command, in one line."""

import json
import sys

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import save_model
from nanoseek.metrics import MetricsLog, read_metrics
from nanoseek.template import r1_completion, r1_prompt
from nanoseek.tokenizer import Tokenizer


def _events(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as the TensorBoard server reads the directory: its plugin EventAccumulator,
    restart purges included (it takes the first session start of a directory for a start, not a restart)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})  # 0: keep every event, no sampling
    acc.Reload()
    return {tag: [(e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def _numeric(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, []).append((r["step"], value))
    return out


def _same(events: dict, expected: dict) -> bool:
    """Equal tags and steps, and values equal to float32 precision (the event file stores float32)."""
    return events.keys() == expected.keys() and all(
        [s for s, _ in events[k]] == [s for s, _ in expected[k]]
        and [v for _, v in events[k]] == pytest.approx([v for _, v in expected[k]], rel=1e-6) for k in expected)


def test_every_numeric_scalar_goes_to_tensorboard_with_its_step(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=str(tmp_path / "tb"))
    records = [{"step": s, "loss": 1 / s, "tokens": 10 * s, "flops_total": 3e12 * s, "finished": False,
                "problems": ["a", "b"], "note": "text"} for s in (1, 2, 3)]
    for r in records:
        log.write(r)
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == records  # metrics.jsonl is unchanged: the source of truth
    events = _events(tmp_path / "tb")
    assert set(events) == {"loss", "tokens", "flops_total"}  # lists, text and flags are not scalars
    assert _same(events, _numeric(records))


def test_a_resumed_run_replaces_the_steps_a_killed_run_logged_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    path, tb = tmp_path / "metrics.jsonl", str(tmp_path / "tb")
    killed = MetricsLog(path, tensorboard=tb)
    for s in (1, 2, 3, 4):
        killed.write({"step": s, "loss": float(s)})
    # SIGKILL here: `killed` is never closed (each record was flushed as it was written)
    resumed = MetricsLog(path, tensorboard=tb)
    resumed.truncate_after(2)  # what a stage's restore does, with its checkpoint's step
    for s in (3, 4, 5):
        resumed.write({"step": s, "loss": 10.0 * s})
    resumed.close()
    expected = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == expected
    assert _events(tb) == {"loss": expected}
    fresh = MetricsLog(tmp_path / "other.jsonl", tensorboard=tb)  # a new run (--force) in the same directory
    fresh.write({"step": 1, "loss": 7.0})
    fresh.close()
    assert _events(tb) == {"loss": [(1, 7.0)]}


def test_a_missing_tensorboard_package_is_refused_at_the_start(tmp_path, monkeypatch, capsys):
    from nanoseek.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # importlib.util.find_spec now reports it missing
    tb = ["--tensorboard", str(tmp_path / "tb")]
    for argv in (["sft", "--init", "x", "--data", "x.jsonl", "--out", str(tmp_path / "s"), *tb],
                 ["distill", "--init", "x", "--teacher", "x", "--task", "chain_sum", "--out", str(tmp_path / "d"),
                  *tb],
                 ["grpo", "--init", "x", "--task", "chain_sum", "--out", str(tmp_path / "g"), *tb],
                 ["pretrain", "--preset", "tiny", "--out", str(tmp_path / "p"), *tb]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--tensorboard needs the tensorboard package: pip install tensorboard" in err[0], err
    assert not list(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(ValueError, match="pip install tensorboard"):
        MetricsLog(tmp_path / "metrics.jsonl", tensorboard=str(tmp_path / "tb"))
    MetricsLog(tmp_path / "metrics.jsonl").write({"step": 1, "loss": 1.0})  # without --tensorboard: no package needed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sink")
    texts = [r1_prompt(f"What is {a} + {b}?") + r1_completion(f"{a} + {b} = {a + b}", str(a + b))
             for a in range(10) for b in range(10)]
    tok = Tokenizer.train(texts, 300)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128, n_mtp_layers=0))
    save_model(model, root / "model", tokenizer_file=root / "tokenizer.json")
    chats = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                           {"role": "assistant", "content": str(a + b)}]} for a in range(4) for b in range(4)]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


def test_sft_and_distill_mirror_their_metrics_into_tensorboard(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from nanoseek.stages.distill import DistillConfig
    from nanoseek.stages.distill import run as distill
    from nanoseek.stages.sft import SFTConfig
    from nanoseek.stages.sft import run as sft

    sft(SFTConfig(init=str(tiny / "model"), data=[str(tiny / "chats.jsonl")], out=str(tmp_path / "s"), epochs=2,
                  batch_size=1, keep_heldout=True, threads=1, tensorboard=str(tmp_path / "tb" / "sft")))
    distill(DistillConfig(init=str(tiny / "model"), teacher=str(tiny / "model"), task="chain_sum",
                          task_args={"max_terms": 2, "max_digits": 1}, out=str(tmp_path / "d"), steps=2,
                          prompts_per_step=2, samples=1, max_new_tokens=4, threads=1,
                          tensorboard=str(tmp_path / "tb" / "distill")))
    from nanoseek.cli import main

    assert main(["grpo", "--init", str(tiny / "model"), "--task", "chain_sum", "--task-args",
                 '{"max_terms": 2, "max_digits": 1}', "--out", str(tmp_path / "g"), "--steps", "2",
                 "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-every", "1",
                 "--eval-n", "2", "--threads", "1", "--tensorboard", str(tmp_path / "tb" / "grpo")]) == 0
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "p"), "--steps", "2", "--n-problems", "50",
                 "--threads", "1", "--tensorboard", str(tmp_path / "tb" / "pretrain")]) == 0
    for run, stage in (("s", "sft"), ("d", "distill"), ("g", "grpo"), ("p", "pretrain")):
        records = read_metrics(tmp_path / run / "metrics.jsonl")
        assert len(records) >= 2 and _same(_events(tmp_path / "tb" / stage), _numeric(records)), stage
