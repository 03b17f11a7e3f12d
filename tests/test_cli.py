"""The `nanoseek` command: outputs, JSON contracts, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import load_model, save_model
from nanoseek.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_compare_json(capsys):
    code, out, _ = run(capsys, "stats", "--compare", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["DeepSeek-V3"]["kv_cache_bytes_per_token"] == 70272
    assert rows["LLaMA-3.1-405B"]["kv_cache_bytes_per_token"] == 516096


def test_stats_text_names_the_convention(capsys):
    code, out, _ = run(capsys, "stats", "deepseek-v3")
    assert code == 0 and "671.03B" in out and "36.63B" in out and "without the embedding lookup" in out
    assert "70,272 B" in out and "250.46 GFLOP" in out


def test_cost_v3_pretraining(capsys):
    code, out, _ = run(capsys, "cost", "deepseek-v3", "--tokens", "14.8e12", "--gpu", "h800", "--mfu", "0.3894",
                       "--price", "2", "--json")
    c = json.loads(out)
    assert code == 0 and c["gpu_hours"] == pytest.approx(2.664e6, rel=0.01) and c["usd"] == pytest.approx(5.33e6, rel=0.01)


def test_cost_of_a_small_model_and_token_suffixes(capsys):
    # a 512-token model is costed at its own sequence length, and a small cost is printed in units that show it
    code, out, _ = run(capsys, "cost", "small", "--tokens", "1e9", "--gpu", "h100", "--json")
    assert code == 0 and json.loads(out)["seq_len"] == 512
    code, out, _ = run(capsys, "cost", "small", "--tokens", "1B", "--gpu", "h100")
    assert code == 0 and "0.000M" not in out and "GPU-hours" in out
    code, out, _ = run(capsys, "cost", "deepseek-v3", "--tokens", "14.8T", "--gpu", "h800", "--json")
    assert code == 0 and json.loads(out)["tokens"] == pytest.approx(14.8e12)
    code, out, _ = run(capsys, "cost", "deepseek-v3", "--tokens", "14.8e12", "--gpu", "h800", "--mfu", "0.3894",
                       "--price", "2")
    assert "2.674M GPU-hours, $5.347M at $2/GPU-hour, 54.4 days on 2048 GPUs" in out


def test_unknown_preset_exits_2_and_lists_presets(capsys):
    code, out, err = run(capsys, "stats", "deepseek-v9")
    assert code == 2 and out == "" and "presets: tiny, small, mini, mini-dense, small-dense, small-lite" in err
    assert "deepseek-v3, deepseek-v3.2, deepseek-v4-flash" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_cost_arguments_exit_2(capsys):
    assert main(["cost", "deepseek-v3", "--tokens", "-5", "--gpu", "h800"]) == 2
    assert "--tokens must be > 0" in capsys.readouterr().err
    assert main(["cost", "deepseek-v3", "--tokens", "1e9", "--gpu", "a100"]) == 2
    assert "invalid choice: 'a100'" in capsys.readouterr().err


def test_stats_of_a_checkpoint_dir(tmp_path, capsys):
    save_model(Transformer(get_preset("tiny")), tmp_path / "ck")
    code, out, _ = run(capsys, "stats", str(tmp_path / "ck"), "--json")
    assert code == 0 and json.loads(out)["total_params"] == 240720  # 207,952 + the 512-entry vocabulary


def test_a_folder_of_runs_names_the_runs_inside_it(tmp_path, capsys):
    save_model(Transformer(get_preset("tiny")), tmp_path / "speedrun" / "rl")
    (tmp_path / "speedrun" / "figures").mkdir()
    code, _, err = run(capsys, "stats", str(tmp_path / "speedrun"))
    assert code == 2 and "the runs inside it: rl" in err and "figures" not in err


def test_import_export_roundtrip(tmp_path, capsys):
    model = Transformer(get_preset("tiny"))
    save_model(model, tmp_path / "ours")
    assert run(capsys, "export", "--ckpt", str(tmp_path / "ours"), "--to", "hf", str(tmp_path / "hf"))[0] == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert run(capsys, "import", str(tmp_path / "hf"), str(tmp_path / "back"))[0] == 0
    back = load_model(tmp_path / "back")
    for a, b in zip(model.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def test_import_bad_dir_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    code, _, err = run(capsys, "import", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert code == 2 and "unsupported model_type 'gpt2'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_console_entry_points_and_help():
    for cmd in ([sys.executable, "-m", "nanoseek", "--help"], [sys.executable, "-m", "nanoseek", "cost", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage: nanoseek" in r.stdout
    r = subprocess.run([sys.executable, "-m", "nanoseek", "stats", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "presets:" in r.stderr


def test_export_of_a_run_directory_keeps_the_tokenizer(tmp_path, capsys):
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(["a b c d e f g h"] * 20, 300)
    tok.save(tmp_path / "tokenizer.json")
    step = tmp_path / "run" / "checkpoints" / "step_000001"
    save_model(Transformer(get_preset("tiny", vocab_size=tok.vocab_size)), step, tokenizer_file=tmp_path / "tokenizer.json")
    assert run(capsys, "export", "--ckpt", str(tmp_path / "run"), str(tmp_path / "hf"))[0] == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()
    assert run(capsys, "export", "--ckpt", str(tmp_path / "run"), str(tmp_path / "hf"))[0] == 2  # exists: refused
    assert run(capsys, "export", "--ckpt", str(tmp_path / "run"), str(tmp_path / "hf"), "--force")[0] == 0


def test_help_never_imports_torch_and_every_command_has_help():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "nanoseek", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "torch" not in r.stderr
    from nanoseek.cli import COMMANDS

    for name in COMMANDS:
        code = main([name, "--help"])
        assert code == 0, name


def test_help_shows_no_empty_choice(capsys):
    assert main(["grpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "{sequence,token,constant}" in out and "{," not in out
    assert main(["pretrain", "--help"]) == 0
    assert "(default: none)" not in capsys.readouterr().out.split("--data", 2)[2].split("--tokenizer")[0]


def test_every_help_ends_with_an_example_that_parses(capsys):
    """Each command's --help shows one example; its flags must be ones the command accepts."""
    import shlex

    from nanoseek.cli import COMMANDS, EXAMPLES, build_parser

    assert set(EXAMPLES) == set(COMMANDS)
    for name, example in EXAMPLES.items():
        assert main([name, "--help"]) == 0
        assert f"example:\n  {example}" in capsys.readouterr().out, name
        argv = shlex.split(example)[1:]
        args = build_parser(argv).parse_args(argv)  # exits 2 on an unknown or malformed flag
        assert args.command == name


def test_a_closed_pipe_ends_quietly():
    r = subprocess.run(f"{sys.executable} -m nanoseek stats --compare | head -c 10", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in r.stderr and len(r.stdout) == 10


def test_tiny_is_usable_with_every_commands_defaults(tmp_path, capsys, monkeypatch):
    """What a newcomer tries first: pretrain `tiny` on the embedded corpus (only --steps shortened), then
    generate, chat, eval and grpo on it with their default settings. Every command must run and exit 0."""
    run = tmp_path / "tiny"
    assert main(["pretrain", "--preset", "tiny", "--out", str(run), "--steps", "2", "--n-problems", "50"]) == 0
    assert main(["generate", "--ckpt", str(run), "--prompt", "The cat"]) == 0
    assert "=== prompt" not in capsys.readouterr().out  # one prompt: only its completion
    assert main(["generate", "--ckpt", str(run), "--prompt", "The cat", "A dog", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=== prompt 1 of 2 ===\n") and "\n\n=== prompt 2 of 2 ===\n" in out
    lines = iter(["What is 2 + 3?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--ckpt", str(run)]) == 0
    assert main(["eval", "--ckpt", str(run), "--task", "chain_sum", "--n", "8"]) == 0
    assert main(["grpo", "--init", str(run), "--task", "chain_sum", "--out", str(tmp_path / "rl"), "--steps",
                 "1", "--eval-n", "8"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err.lower(), err[-2000:]
    # countdown's prompts (~200 tokens) and the default 96 new tokens do not fit tiny's 256 positions: the response
    # limit is fitted to the model, and the run says so
    assert main(["grpo", "--init", str(run), "--task", "countdown", "--out", str(tmp_path / "rl-countdown"),
                 "--steps", "1", "--eval-n", "4", "--prompts-per-step", "2", "--group-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "--max-new-tokens 96 capped to" in err and "Traceback" not in err, err[-2000:]


def test_eval_of_several_checkpoints_equals_evaluating_each_alone(tmp_path, capsys):
    """One process scores every --ckpt on the same problems (the speedrun's five evaluations); each line is
    what evaluating that checkpoint alone prints, and a bad path fails before anything is scored."""
    run = tmp_path / "tiny"
    assert main(["pretrain", "--preset", "tiny", "--out", str(run), "--steps", "2", "--n-problems", "50",
                 "--save-every", "1", "--eval-batches", "0"]) == 0
    first = str(run / "checkpoints" / "step_000001")
    flags = ["--task", "chain_sum", "--n", "6", "--k", "2", "--max-new-tokens", "6", "--json"]
    capsys.readouterr()
    assert main(["eval", "--ckpt", first, str(run), *flags]) == 0
    together = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    alone = []
    for path in (first, str(run)):
        assert main(["eval", "--ckpt", path, *flags]) == 0
        alone.append(json.loads(capsys.readouterr().out))
    assert [r["ckpt"] for r in together] == [first, str(run)]
    assert together == alone  # runtime records included: the precision is decided the same way each time
    assert main(["eval", "--ckpt", first, str(tmp_path / "missing"), *flags]) == 2
    assert capsys.readouterr().out == ""


def test_several_checkpoints_are_scored_at_one_precision(tmp_path, capsys, monkeypatch):
    """Scores compared side by side are computed the same way: the precision is decided once, for all of them (when
    a probe decided per checkpoint, a teacher and its student fell on both sides of its threshold): the one their
    checkpoints recorded when they agree, else from the hardware and the rows decoded together. Here a CPU with
    native bf16 and 128 rows."""
    from nanoseek import checkpoint as ckpt
    from nanoseek import runtime
    from nanoseek.stages import evaluate

    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir, overrides in zip(runs, ({}, {"dim": 96, "inter_dim": 160})):
        assert main(["pretrain", "--preset", "tiny", "--out", str(run_dir), "--steps", "1", "--n-problems", "50",
                     "--eval-batches", "0", "--precision", "fp32", "--model-overrides", json.dumps(overrides)]) == 0
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)

    def scored():
        calls = []
        monkeypatch.setattr(evaluate, "resolve", lambda *args, **kw: calls.append(kw) or runtime.resolve(*args, **kw))
        capsys.readouterr()
        assert main(["eval", "--ckpt", *map(str, runs), "--task", "chain_sum", "--n", "32", "--k", "4",
                     "--max-new-tokens", "2", "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(calls) == 1 and lines[0]["runtime"] == lines[1]["runtime"]  # one decision for both
        return calls[0], [r["precision"] for r in lines], lines[0]["runtime"]["reason"]

    assert scored() == ({"rows": 128, "recorded": "fp32"}, ["fp32", "fp32"], "recorded by the checkpoint (fp32)")
    meta = ckpt.step_dirs(runs[1])[-1] / "meta.json"  # b no longer says: the records disagree, the hardware decides
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "precision"}))
    call, precisions, reason = scored()
    assert call == {"rows": 128, "recorded": None} and precisions == ["bf16", "bf16"]
    assert reason.endswith("128 rows per matmul, bf16 from 128")


# ----------------------------------------------------------------------------- defaults from the run's record (#39)

FOUR = {"min_terms": 4, "max_terms": 4, "min_digits": 1, "max_digits": 1}


def _terms(question: str) -> int:
    """The number of terms of a chain_sum question ("… problem: 3 - 9 + 1 + 4 =")."""
    return len(question.split(":")[1].replace("-", "+").split("+"))


def _recorded_run(root, name: str, record: dict):
    """A run directory: a tiny checkpoint with a tokenizer, and the run.json `record`."""
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(["State the final answer to the following arithmetic problem: 3 + 4 - 1 =",
                           "<think> 3 + 4 = 7 </think> <answer> 6 </answer>"] * 20, 300)
    tok.save(root / "tokenizer.json")
    run_dir = root / name
    save_model(Transformer(get_preset("tiny", vocab_size=tok.vocab_size)), run_dir / "checkpoints" / "step_000001",
               tokenizer_file=root / "tokenizer.json")
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def _eval(capsys, *argv):
    code, out, err = run(capsys, "eval", *argv, "--n", "3", "--max-new-tokens", "2", "--json", "--threads", "1")
    return code, [json.loads(line) for line in out.splitlines()], err


def test_eval_defaults_to_the_task_the_run_recorded(tmp_path, capsys):
    """`eval --ckpt RL` scores RL's own task and options (not eval's family defaults), saying where they came
    from; a --task-args that differs overrides them and says so."""
    rl = _recorded_run(tmp_path, "rl", {"command": "grpo", "task": "chain_sum", "task_args": FOUR})
    for flags in ([], ["--task", "chain_sum"]):  # --task alone, the same family: the recorded options still hold
        code, (r,), err = _eval(capsys, "--ckpt", str(rl), *flags)
        assert code == 0 and r["task"] == "chain_sum" and r["task_args"] == FOUR
        assert all(_terms(p["question"]) == 4 for p in r["problems"])
        assert f'eval: task chain_sum {json.dumps(FOUR)} from {rl / "run.json"}' in err
    five = {"min_terms": 5, "max_terms": 5}
    code, (r,), err = _eval(capsys, "--ckpt", str(rl / "checkpoints" / "step_000001"), "--task-args", json.dumps(five))
    assert code == 0 and r["task_args"] == five and all(_terms(p["question"]) == 5 for p in r["problems"])
    assert len([line for line in err.splitlines() if "overrides" in line]) == 1 and str(rl / "run.json") in err


def test_eval_defaults_to_the_seed_the_run_recorded(tmp_path, capsys):
    """A speedrun draws its held-out problems (and its sampling seeds) with its --seed: `eval --ckpt RL` with no
    --seed scores those problems, with 4 samples each, as the report did; --seed overrides it."""
    from nanoseek.tasks import get_task

    rl = _recorded_run(tmp_path, "rl", {"command": "grpo", "task": "chain_sum", "task_args": FOUR, "seed": 3})
    code, (r,), err = _eval(capsys, "--ckpt", str(rl))
    report = get_task("chain_sum", **FOUR).problems(3, 3, split="heldout")
    assert code == 0 and r["seed"] == 3 and r["k"] == 4 and "eval: seed 3 from the run's run.json" in err
    assert [p["id"] for p in r["problems"]] == [p.id for p in report]
    code, (r,), err = _eval(capsys, "--ckpt", str(rl), "--seed", "0")
    assert code == 0 and r["seed"] == 0 and "seed 3" not in err
    assert [p["id"] for p in r["problems"]] == [p.id for p in get_task("chain_sum", **FOUR).problems(0, 3, "heldout")]


def test_eval_follows_the_init_chain_when_unambiguous(tmp_path, capsys, monkeypatch):
    """An SFT run records only its data: its task is its --init's, a pretraining run whose worked chain_sum
    problems outnumber the mixed ones. Relative inits are relative to where the runs were started (found from
    the run's recorded --out), wherever the command runs now. Nothing recorded and no --task: exit 2."""
    from nanoseek.evaluation import recorded_task

    two = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    base = _recorded_run(work / "runs", "base", {"command": "pretrain", "out": "runs/base", "data": [],
                                                 "easy_problems": 3000, "n_problems": 200, "easy_args": two})
    cold = _recorded_run(work / "runs", "cold", {"command": "sft", "init": "runs/base", "out": "runs/cold",
                                                 "data": ["runs/cold.jsonl"]})
    monkeypatch.chdir(tmp_path)  # "runs/base" does not exist from here
    task, args, source = recorded_task(cold)
    assert (task, args, source.resolve()) == ("chain_sum", two, (base / "run.json").resolve())
    code, (r,), err = _eval(capsys, "--ckpt", str(cold))
    assert code == 0 and r["task_args"] == two and "from work/runs/base/run.json" in err
    mixed = _recorded_run(tmp_path, "mixed", {"command": "pretrain", "data": [], "easy_problems": 100,
                                              "n_problems": 6000, "easy_args": two})
    assert recorded_task(mixed) is None  # mostly other families: no one task to default to
    code, out, err = run(capsys, "eval", "--ckpt", str(mixed), "--n", "1", "--threads", "1")
    assert code == 2 and out == "" and "no run.json records the task trained on; give --task" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_of_runs_that_recorded_different_tasks_needs_task_args(tmp_path, capsys):
    """Several checkpoints are scored on the same problems: their recordings must agree, else --task-args."""
    a = _recorded_run(tmp_path, "a", {"command": "grpo", "task": "chain_sum", "task_args": FOUR})
    b = _recorded_run(tmp_path, "b", {"command": "distill", "task": "chain_sum", "task_args": {**FOUR, "min_terms": 3}})
    same = _recorded_run(tmp_path, "same", {"command": "grpo", "task": "chain_sum", "task_args": FOUR})
    code, out, err = run(capsys, "eval", "--ckpt", str(a), str(b), "--n", "1", "--threads", "1")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "the runs recorded different tasks" in err and "give --task-args" in err
    code, results, err = _eval(capsys, "--ckpt", str(a), str(b), "--task-args", json.dumps(FOUR))
    assert code == 0 and [r["task_args"] for r in results] == [FOUR, FOUR]
    assert "overrides what the run recorded" in err and str(b / "run.json") in err
    code, results, err = _eval(capsys, "--ckpt", str(a), str(same))
    assert code == 0 and [r["task_args"] for r in results] == [FOUR, FOUR] and "overrides" not in err


def test_one_sampling_default_r1s(capsys):
    """chat, generate and eval sample at R1's 0.6 / top-p 0.95 unless told otherwise (chat and generate used 1.0),
    and --help says so."""
    from nanoseek.stages.evaluate import EvalConfig
    from nanoseek.stages.generate import ChatConfig, GenerateConfig

    for make in (lambda: ChatConfig(ckpt="x"), lambda: GenerateConfig(ckpt="x"), lambda: EvalConfig(ckpt=["x"])):
        cfg = make()
        assert (cfg.temperature, cfg.top_p) == (0.6, 0.95), type(cfg).__name__
    params = ChatConfig(ckpt="x").sampling()
    assert (params.temperature, params.top_p) == (0.6, 0.95)
    for command in ("chat", "generate", "serve"):
        assert main([command, "--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert "0.6" in help_text and "0.95" in help_text, command
    from nanoseek.evaluation import R1_SAMPLING  # the one place it is written

    assert tuple(R1_SAMPLING) == (0.6, 0.95)


def test_chat_starts_with_what_the_run_trained_on_and_an_example(tmp_path, capsys, monkeypatch):
    """`nanoseek chat` names the recorded task and shows a question in its own format (not "What is 3 + 4?"),
    which /example asks."""
    rl = _recorded_run(tmp_path, "rl", {"command": "grpo", "task": "chain_sum", "task_args": FOUR})
    lines = iter(["/example", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--ckpt", str(rl), "--max-new-tokens", "4", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert f"trained on: chain_sum {json.dumps(FOUR)} ({rl / 'run.json'})" in err
    example = err.split("try (/example): ")[1].splitlines()[0]
    assert example.startswith("State the final answer to the following arithmetic problem: ") and _terms(example) == 4
    assert f"you> {example}" in err and out.startswith("assistant> ")  # /example asked it
