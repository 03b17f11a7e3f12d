"""SFT packing and loss masking, chat rows (loss on the assistant turns), distillation, and rejection sampling to
JSONL."""

import json

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import load, save_model
from nanoseek.losses import IGNORE_INDEX
from nanoseek.stages.common import read_metrics
from nanoseek.stages.sample import SampleConfig
from nanoseek.stages.sample import run as sample
from nanoseek.engine import Engine
from nanoseek.evaluation import evaluate
from nanoseek.stages.sft import SFTConfig, _progress_step, chat_examples, drop_heldout, encode, pack, read_examples
from nanoseek.stages.sft import run as sft
from nanoseek.tasks import get_task, is_heldout, problem_key, question_from_prompt
from nanoseek.template import ANSWER, END_ANSWER, END_THINK, conversation, r1_completion, r1_prompt
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
                         epochs=4, batch_size=1, lr=3e-3))  # ~13 packed rows: 52 steps
    losses = [r["loss"] for r in read_metrics(tmp_path / "s" / "metrics.jsonl")]
    assert losses[-1] < 0.6 * losses[0]
    assert load(path)[1] is not None  # the tokenizer travels with the checkpoint


def test_logit_distillation_pulls_the_student_to_the_teacher(setup, tmp_path):
    """kd_loss is τ²·KL(teacher || student): zero when the teacher is the student itself, and falling as a
    student trained on the distillation loss alone (kd_weight 1) moves toward a different teacher."""
    common = dict(data=[str(setup / "traces.jsonl")], batch_size=8, kd_weight=1.0, seed=0)
    sft(SFTConfig(init=str(setup / "student"), out=str(tmp_path / "self"), epochs=1, lr=1e-9,
                  teacher=str(setup / "student"), **common))
    assert read_metrics(tmp_path / "self" / "metrics.jsonl")[0]["kd_loss"] < 1e-4
    sft(SFTConfig(init=str(setup / "student"), out=str(tmp_path / "kd"), epochs=4, lr=3e-3,
                  teacher=str(setup / "teacher"), **common))
    kd = [r["kd_loss"] for r in read_metrics(tmp_path / "kd" / "metrics.jsonl")]
    assert kd[0] > 1e-3 and kd[-1] < 0.5 * kd[0], kd


def test_bad_trace_file_is_named(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_examples([str(bad)])


class _ScriptedEngine:
    """Stands in for the engine in `sample`: sample j of a problem answers correctly when j is even, wrongly
    when odd, and sample 2 repeats sample 0's text (a duplicate rejection sampling must drop)."""

    def __init__(self, model, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts, params, seeds=None):
        from nanoseek.engine import Generation
        from nanoseek.tasks.verify import parse_number

        out = []
        for i, prompt in enumerate(prompts):
            question = question_from_prompt(prompt)
            expr = question.split(":")[-1].rstrip(" =").strip()  # two one-digit terms: "3 + 4"
            a, op, b = expr.split()
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            j = i % 3
            answer = value if j % 2 == 0 else value + 1
            out.append(Generation(prompt_tokens=[1], tokens=[1, 2], text=r1_completion(expr, str(answer)),
                                  finish_reason="stop"))
            assert parse_number(str(answer)) is not None
        return out


def test_rejection_sampling_keeps_only_verified_deduplicated_traces(setup, tmp_path, monkeypatch):
    import nanoseek.stages.sample as sample_stage

    monkeypatch.setattr(sample_stage, "Engine", _ScriptedEngine)
    monkeypatch.setattr(sample_stage, "prepare_inference", lambda model, rt: model)
    common = dict(ckpt=str(setup / "student"), task="chain_sum", n=6, k=3, max_new_tokens=8,
                  task_args={"min_terms": 2, "max_terms": 2, "max_digits": 1})
    everything = sample(SampleConfig(out=str(tmp_path / "all.jsonl"), keep="all", batch=3, **common))
    kept = sample(SampleConfig(out=str(tmp_path / "ok.jsonl"), keep="correct", batch=3, **common))
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    ok = [json.loads(line) for line in (tmp_path / "ok.jsonl").read_text().splitlines()]
    assert everything["generated"] == kept["generated"] == 18
    assert kept["correct"] == 12 and len(ok) == kept["kept"] == 6  # two correct per problem, one a duplicate
    assert everything["kept"] == len(rows) == 12  # every distinct text once
    for key in ("prompt", "completion", "task", "problem_id", "gold", "reward", "checkpoint", "seed", "sample"):
        assert key in rows[0]
    assert all(r["accuracy"] == 1 and r["format"] == 1 and r["answer"] == r["gold"] for r in ok)
    assert len({r["problem_id"] for r in ok}) == 6


def test_sft_drops_traces_of_heldout_problems(setup, tmp_path):
    pairs = read_examples([str(setup / "traces.jsonl")])
    kept, dropped = drop_heldout(pairs)
    expected = sum(is_heldout(question_from_prompt(p)) for p, _ in pairs)
    assert dropped == expected > 0 and len(kept) == len(pairs) - dropped
    assert not any(is_heldout(question_from_prompt(p)) for p, _ in kept)
    sft(SFTConfig(init=str(setup / "student"), data=[str(setup / "traces.jsonl")], out=str(tmp_path / "s"),
                  epochs=1, batch_size=8))
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert run["dropped_heldout"] == expected and run["examples"] == len(kept)
    sft(SFTConfig(init=str(setup / "student"), data=[str(setup / "traces.jsonl")], out=str(tmp_path / "k"),
                  epochs=1, batch_size=8, keep_heldout=True))
    assert json.loads((tmp_path / "k" / "run.json").read_text())["dropped_heldout"] == 0


def test_a_time_limit_keeps_the_schedule_honest():
    assert _progress_step(10, 100, 5.0, 0.0) == 10  # no limit: the step decides
    assert _progress_step(10, 100, 30.0, 60.0) == 50  # half the time gone: half the schedule
    assert _progress_step(90, 100, 1.0, 60.0) == 90 and _progress_step(5, 100, 600.0, 60.0) == 99


def test_rejection_sampling_never_writes_heldout_problems(setup, tmp_path):
    common = dict(ckpt=str(setup / "student"), task="chain_sum", k=2, max_new_tokens=4,
                  task_args={"max_terms": 2, "max_digits": 1})
    with pytest.raises(ValueError, match="held-out"):
        sample(SampleConfig(out=str(tmp_path / "x.jsonl"), n=4, keep="correct", split="heldout", **common))
    sample(SampleConfig(out=str(tmp_path / "all.jsonl"), n=30, keep="all", **common))
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    heldout = {problem_key(p.question) for p in get_task("chain_sum", **common["task_args"]).problems(
        0, 15, split="heldout")}
    assert len(rows) == 60 and all(r["split"] == "train" for r in rows)
    assert not {problem_key(r["question"]) for r in rows} & heldout
    assert not any(is_heldout(question_from_prompt(r["prompt"])) for r in rows)


def test_evaluate_lists_the_problems_it_scored(setup):
    model, tok = load(setup / "student")
    task = get_task("chain_sum", max_terms=2, max_digits=1)
    problems = task.problems(0, 5, split="heldout")
    r = evaluate(Engine(model, tok), task, problems, k=3, max_new_tokens=4)
    assert [p["question"] for p in r["problems"]] == [p.question for p in problems]
    assert all(len(p["correct"]) == 3 and p["answer"] == q.answer for p, q in zip(r["problems"], problems))
    assert r["accuracy"] == pytest.approx(sum(map(sum, (p["correct"] for p in r["problems"]))) / 15)
    json.dumps(r)  # what `nanoseek eval --json` prints


def _sft_args(setup, out, *extra):
    return ["sft", "--init", str(setup / "student"), "--data", str(setup / "traces.jsonl"), "--out", str(out),
            "--epochs", "2", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2", "--save-every", "3",
            "--precision", "fp32", "--threads", "1", *extra]


def test_kill_and_resume_continues_the_uninterrupted_run_exactly(setup, tmp_path, capsys):
    """SIGKILL after a checkpoint, then --resume: the same metrics.jsonl (every value, across the epoch boundary:
    the data order is part of the checkpoint) and the same final weights, bit for bit."""
    from safetensors.torch import load_file

    from tests.killing import kill_after

    from nanoseek import checkpoint as ckpt
    from nanoseek.cli import main

    assert main(_sft_args(setup, tmp_path / "a")) == 0
    final = ckpt.step_dirs(tmp_path / "a")[-1]
    kill_after(_sft_args(setup, tmp_path / "b"), tmp_path / "b" / "checkpoints" / "step_000003")
    assert 3 <= int(ckpt.step_dirs(tmp_path / "b")[-1].name[5:]) < int(final.name[5:])  # killed mid-run
    assert main(["sft", "--out", str(tmp_path / "b"), "--resume"]) == 0
    reference = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert read_metrics(tmp_path / "b" / "metrics.jsonl") == reference and reference[-1]["epoch"] == 2
    a, b = (load_file(str(d / "checkpoints" / final.name / "model.safetensors")) for d in (tmp_path / "a",
                                                                                          tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["sft", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main(["sft", "--out", str(tmp_path / "b"), "--resume", "--force"]) == 2
    assert main(["sft", "--out", str(tmp_path / "b"), "--resume", "--epochs", "3"]) == 2


# ----------------------------------------------------------------------------- chat rows

CHAT = [{"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]


def test_chat_rows_are_rendered_with_the_chat_template_and_train_the_assistant_turns_only(setup, tmp_path):
    """A messages row reads as the context chat/serve would send (template.conversation, system line included)
    alternating with the assistant replies, and only the replies (and the closing eos) become targets. A
    prompt/completion row may share the file."""
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "p", "completion": " c"}) + "\n")
    chat, plain = read_examples([str(data)])
    assert plain == ("p", " c")
    assert chat[0] == conversation(CHAT[:2])  # "You add numbers.\nUser: What is 2 + 3?\nAssistant: <think>"
    assert "".join(chat[:3]) == conversation(CHAT[:4])  # the second question sees the history as chat shows it
    assert chat[1::2] == tuple(f" {END_THINK} {ANSWER} {a} {END_ANSWER}" for a in ("5", "8"))
    tok = Tokenizer.load(setup / "tokenizer.json")
    ids = encode(tok, chat)
    assert [t for piece in ids for t in piece] == tok.encode("".join(chat)) + [tok.eos_id]  # pieces = the whole
    row = pack([ids], seq_len=256, pad=tok.pad_id)[0]
    assert [t for t in row["targets"] if t != IGNORE_INDEX] == tok.encode(chat[1]) + tok.encode(chat[3]) + [tok.eos_id]


def test_chat_replies_with_reasoning_are_trained_with_it_and_shown_without():
    """A reply's reasoning (DeepSeek's reasoning_content, or inline <think> … </think>) is trained in the R1
    completion format; later turns see that reply by its answer alone (as chat and serve send the history), so
    the conversation continues in a new example."""
    msgs = [{"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5."},
            {"role": "user", "content": "And 4 + 4?"},
            {"role": "assistant", "content": "<think> 4 + 4 = 8. </think> <answer> 8 </answer>"}]
    first, second = chat_examples(msgs)
    assert first == (r1_prompt("What is 2 + 3?"), r1_completion("2 + 3 = 5.", "5"))
    assert second == (conversation(msgs[:3]), r1_completion("4 + 4 = 8.", "8"))
    assert "2 + 3 = 5." not in second[0]
    assert chat_examples(msgs[:3] + [{"role": "assistant", "content": "4 + 4 = 8.</think>8"}])[1] == second


@pytest.mark.parametrize("row, message", [
    ({"messages": [CHAT[0], CHAT[1]]}, "no assistant turn"),
    ({"messages": [CHAT[2], CHAT[1]]}, r"messages\[0\]: an assistant turn must follow a user turn"),
    ({"messages": [CHAT[1], {"role": "tool", "content": "x"}]}, r"messages\[1\]: unknown role 'tool'"),
    ({"messages": [CHAT[1], CHAT[0], CHAT[2]]}, "a system message must come first"),
    ({"messages": [CHAT[1], {"role": "assistant", "content": ["5"]}]}, "list of"),
    ({"messages": [CHAT[1], {"role": "assistant", "content": "<answer> 5 </answer>"}]}, "misplaced"),
    ({"messages": CHAT, "prompt": "p", "completion": "c"}, "not both"),
    (["p", "c"], "prompt and completion, or with messages"),
])
def test_a_bad_chat_row_is_named_by_its_line(tmp_path, row, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        read_examples([str(bad)])


def test_sft_refuses_a_chat_without_an_assistant_turn_in_one_line(setup, tmp_path, capsys):
    from nanoseek.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[:2]}) + "\n")
    assert main(["sft", "--init", str(setup / "student"), "--data", str(bad), "--out", str(tmp_path / "o"),
                 "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:2: the conversation has no assistant turn" in err[0], err
    assert not (tmp_path / "o").exists()


def test_chat_rows_asking_a_heldout_question_are_dropped(setup):
    questions = [question_from_prompt(p) for p, _ in read_examples([str(setup / "traces.jsonl")])]
    held = next(q for q in questions if is_heldout(q))
    free = next(q for q in questions if not is_heldout(q))

    def chat(*asked):
        return chat_examples([m for q in asked for m in ({"role": "user", "content": q},
                                                         {"role": "assistant", "content": "1"})])

    kept = chat(free, free)
    assert drop_heldout(chat(free, held) + chat(held) + kept) == (kept, 2)


def test_sft_on_chat_rows_trains_on_the_assistant_tokens_alone(setup, tmp_path):
    """The step's `tokens` (targets that carry loss) are exactly the replies' tokens plus one eos per chat."""
    def turns(question: str, answer: int) -> list[dict]:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": str(answer)}]

    rows = [{"messages": turns(f"What is {a} + {b}?", a + b) + turns("Twice that?", 2 * (a + b))}
            for a, b in ((1, 2), (3, 4), (5, 6))]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft(SFTConfig(init=str(setup / "student"), data=[str(data)], out=str(tmp_path / "s"), epochs=1, batch_size=8,
                  keep_heldout=True, threads=1))
    tok = Tokenizer.load(setup / "tokenizer.json")
    examples = read_examples([str(data)])
    assert len(examples) == 3 and all(len(e) == 4 for e in examples)  # one example per chat, both turns in it
    expected = sum(len(tok.encode(reply)) for e in examples for reply in e[1::2]) + len(examples)
    assert [r["tokens"] for r in read_metrics(tmp_path / "s" / "metrics.jsonl")] == [expected]
