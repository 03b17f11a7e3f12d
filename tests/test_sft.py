"""SFT packing and loss masking, distillation, and rejection sampling to JSONL."""

import json

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import load, save_model
from nanoseek.losses import IGNORE_INDEX
from nanoseek.stages.common import read_metrics
from nanoseek.stages.sample import SampleConfig
from nanoseek.stages.sample import run as sample
from nanoseek.stages.sft import SFTConfig, pack, read_examples
from nanoseek.stages.sft import run as sft
from nanoseek.template import r1_completion, r1_prompt
from nanoseek.tokenizer import Tokenizer


def test_pack_masks_prompts_and_separates_samples():
    rows = pack([([1, 2, 3], [4, 5]), ([6, 7], [8]), ([9] * 6, [10, 11])], seq_len=8, pad=0)
    assert len(rows) == 2
    first = next(r for r in rows if 9 in r["inputs"])
    assert first["inputs"] == [9] * 6 + [10, 0] and first["targets"][:7] == [IGNORE_INDEX] * 5 + [10, 11]
    other = next(r for r in rows if 1 in r["inputs"])
    assert other["inputs"] == [1, 2, 3, 4, 6, 7, 0, 0]
    assert other["targets"] == [IGNORE_INDEX, IGNORE_INDEX, 4, 5, IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]
    assert other["positions"] == [0, 1, 2, 3, 0, 1, 0, 0] and other["segments"] == [0, 0, 0, 0, 1, 1, -1, -1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    texts = [r1_prompt(f"What is {a} + {b}?") + r1_completion(f"{a} + {b} = {a + b}", str(a + b))
             for a in range(10) for b in range(10)]
    tok = Tokenizer.train(texts, 300)
    tok.save(root / "tokenizer.json")
    traces = root / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": r1_prompt(f"What is {a} + {b}?"),
                                          "completion": r1_completion(f"{a} + {b} = {a + b}", str(a + b))}) + "\n"
                              for a in range(10) for b in range(10)))
    torch.manual_seed(0)
    for name, preset in (("teacher", "tiny"), ("student", "tiny")):
        model = Transformer(get_preset(preset, vocab_size=tok.vocab_size, max_seq_len=256, n_mtp_layers=0))
        save_model(model, root / name, tokenizer_file=root / "tokenizer.json")
    return root


def test_sft_learns_the_traces(setup, tmp_path):
    path = sft(SFTConfig(init=str(setup / "student"), data=[str(setup / "traces.jsonl")], out=str(tmp_path / "s"),
                         epochs=4, batch_size=4, lr=3e-3))
    losses = [r["loss"] for r in read_metrics(tmp_path / "s" / "metrics.jsonl")]
    assert losses[-1] < 0.6 * losses[0]
    assert load(path)[1] is not None  # the tokenizer travels with the checkpoint


def test_logit_distillation_option(setup, tmp_path):
    sft(SFTConfig(init=str(setup / "student"), data=[str(setup / "traces.jsonl")], out=str(tmp_path / "kd"),
                  epochs=1, batch_size=8, teacher=str(setup / "teacher")))
    records = read_metrics(tmp_path / "kd" / "metrics.jsonl")
    assert all(r["kd_loss"] >= 0 for r in records)


def test_bad_trace_file_is_named(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_examples([str(bad)])


def test_rejection_sampling_keeps_only_verified_traces(setup, tmp_path):
    common = dict(ckpt=str(setup / "student"), task="chain_sum", n=6, k=2, max_new_tokens=8,
                  task_args={"max_terms": 2, "max_digits": 1})
    everything = sample(SampleConfig(out=str(tmp_path / "all.jsonl"), keep="all", **common))
    kept = sample(SampleConfig(out=str(tmp_path / "ok.jsonl"), keep="correct", **common))
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert everything["generated"] == 12 and len(rows) == everything["kept"] <= 12
    for key in ("prompt", "completion", "task", "problem_id", "gold", "reward", "checkpoint", "seed", "sample"):
        assert key in rows[0]
    good = [r for r in rows if r["accuracy"] == 1 and r["format"] == 1]
    assert kept["kept"] == len(good) == kept["correct"]
