"""Every subcommand against a generated table of bad inputs: exit status 2, no traceback, one line on stderr (the
usage too when the flags themselves are wrong), and every file that existed before untouched.

The value cases are generated from each command's config dataclass (options.option declarations): for every
declared range a value just outside it, for every choice list a value not in it, for every number a word. The
path cases put each output flag on an existing file, a non-empty foreign directory and an earlier run, and each
input flag on a missing path, a file of the wrong kind and a damaged checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import save_model
from nanoseek.cli import COMMANDS, main
from nanoseek.template import r1_completion, r1_prompt
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A directory of things a user might have: a checkpoint, a damaged copy, files, a foreign directory."""
    root = tmp_path_factory.mktemp("user")
    texts = [r1_prompt(f"What is {a} + {b}?") + r1_completion(f"{a}+{b}={a + b}", str(a + b))
             for a in range(10) for b in range(10)]
    tok = Tokenizer.train(texts, 300)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    save_model(Transformer(get_preset("tiny", vocab_size=tok.vocab_size)), root / "ckpt",
               tokenizer_file=root / "tokenizer.json")
    save_model(Transformer(get_preset("tiny", vocab_size=tok.vocab_size)), root / "damaged",
               tokenizer_file=root / "tokenizer.json")
    weights = root / "damaged" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-90] = b"\xff" * 10  # flipped bytes in the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    (root / "file.txt").write_text("a user's notes\n")
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00\x81")
    (root / "foreign").mkdir()
    (root / "foreign" / "keep.txt").write_text("do not delete\n")
    (root / "run").mkdir()
    (root / "run" / "run.json").write_text(json.dumps({"command": "pretrain", "preset": "tiny"}))
    (root / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    (root / "traces.jsonl").write_text(json.dumps({"prompt": r1_prompt("1 + 1"), "completion": " 2 </think>"}) + "\n")
    (root / "empty.jsonl").write_text("")
    return root


def _base(t: Path) -> dict[str, list[str]]:
    """A valid invocation per command (never run: each case changes one thing to make it invalid)."""
    new = str(t / "new")
    return {
        "stats": ["tiny"], "cost": ["tiny", "--tokens", "1e9", "--gpu", "h800"],
        "pretrain": ["--out", new, "--preset", "tiny", "--steps", "1"],
        "grpo": ["--init", str(t / "ckpt"), "--task", "chain_sum", "--out", new, "--steps", "1"],
        "sample": ["--ckpt", str(t / "ckpt"), "--task", "chain_sum", "--out", str(t / "new.jsonl"), "--n", "1"],
        "sft": ["--init", str(t / "ckpt"), "--data", str(t / "traces.jsonl"), "--out", new],
        "distill": ["--init", str(t / "ckpt"), "--teacher", str(t / "ckpt"), "--task", "chain_sum", "--out", new,
                    "--steps", "1"],
        "eval": ["--ckpt", str(t / "ckpt"), "--task", "chain_sum", "--n", "1"],
        "generate": ["--ckpt", str(t / "ckpt"), "--prompt", "hi", "--max-new-tokens", "1"],
        "chat": ["--ckpt", str(t / "ckpt")], "serve": ["--ckpt", str(t / "ckpt"), "--port", "0"],
        "import": [str(t / "ckpt"), new], "export": [new, "--ckpt", str(t / "ckpt")],
        "speedrun": ["--out", new],
    }


def _bad_values(f: dataclasses.Field) -> list[str]:
    m, kind = f.metadata, str(f.type)
    out = []
    for key, step in (("min", -1), ("max", 1)):
        if m.get(key) is not None:
            out.append(str(m[key] + step))
    for key in ("above", "below"):
        if m.get(key) is not None:
            out.append(str(m[key]))
    if m.get("choices"):
        out.append("no-such-choice")
    if kind in ("int", "float"):
        out.append("abc")
    if kind == "dict":
        out += ["not-json", "[1, 2]"]
    return out


def _value_cases():
    cases = []
    for command, (module, cls_name, _, _) in COMMANDS.items():
        cls = getattr(importlib.import_module(f"nanoseek.{module}"), cls_name)
        for f in dataclasses.fields(cls):
            if f.metadata.get("positional") or not f.metadata.get("cli", True):
                continue
            for value in _bad_values(f):
                cases.append((command, ["--" + f.name.replace("_", "-"), value]))
        cases.append((command, ["--no-such-flag", "1"]))
    return cases


def _path_cases(t: Path):
    ckpt, damaged, file, foreign, run = (str(t / n) for n in ("ckpt", "damaged", "file.txt", "foreign", "run"))
    outs = [file, foreign]
    cases = [("pretrain", ["--out", o]) for o in outs + [run]]
    cases += [("pretrain", ["--out", str(t / "new"), "--resume"]), ("pretrain", ["--out", run, "--resume"]),
              ("pretrain", ["--tokenizer", str(t / "missing.json")]), ("pretrain", ["--vocab-size", "100"]),
              ("pretrain", ["--model-overrides", '{"no_such_field": 1}']),
              ("pretrain", ["--document-mask"])]  # tiny has an MTP layer, which takes no document segments
    for command, flag in (("grpo", "--init"), ("sft", "--init"), ("distill", "--init"), ("distill", "--teacher"),
                          ("sample", "--ckpt"), ("eval", "--ckpt"),
                          ("generate", "--ckpt"), ("chat", "--ckpt"), ("export", "--ckpt")):
        cases += [(command, [flag, p]) for p in (str(t / "missing"), file, foreign, damaged)]
    cases += [(c, ["--out", o]) for c in ("grpo", "sft", "distill", "speedrun") for o in outs]
    cases += [("sample", ["--out", file]), ("sample", ["--out", foreign]), ("sft", ["--data", str(t / "missing")]),
              ("sft", ["--data", file]), ("sft", ["--data", str(t / "empty.jsonl")]),
              ("generate", ["--prompt-file", str(t / "binary.bin")]), ("generate", ["--prompt", " "]),
              ("generate", ["--prompt-file", str(t / "missing")]), ("stats", [file]), ("stats", [str(t / "missing")]),
              ("grpo", ["--task-args", '{"no_such_option": 1}']), ("eval", ["--task-args", '{"no_such_option": 1}'])]
    cases += [("import", [str(t / "missing"), str(t / "new")]), ("import", [ckpt, file]), ("import", [ckpt, foreign]),
              ("import", [file, str(t / "new")]), ("export", [file]), ("export", [foreign])]
    return cases


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _argv(command: str, change: list[str], t: Path) -> list[str]:
    """The command's valid invocation with one thing changed: a flag's value (change = [--flag, value...]) or,
    when change starts with a non-flag, its leading positionals."""
    base = _base(t)[command]
    n_pos = next((i for i, a in enumerate(base) if a.startswith("--")), len(base))
    positionals, flags = base[:n_pos], base[n_pos:]
    if not change[0].startswith("--"):
        return [command, *change, *positionals[len(change):], *flags]
    if change[0] in flags:  # drop the flag's old value
        i = flags.index(change[0])
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        flags = flags[:i] + flags[j:]
    return [command, *positionals, *flags, *change]


@pytest.mark.parametrize("command,change", _value_cases(), ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_bad_values(command, change, tree, capsys):
    _check(_argv(command, change, tree), tree, capsys, usage=change[0] == "--no-such-flag")


@pytest.mark.parametrize("index", range(len(_path_cases(Path("/x")))))
def test_bad_paths(index, tree, capsys):
    command, change = _path_cases(tree)[index]
    _check(_argv(command, change, tree), tree, capsys, usage=False)


def _check(argv: list[str], tree: Path, capsys, usage: bool) -> None:
    before = _snapshot(tree)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    if usage:
        assert "usage: nanoseek" in err and "unrecognized arguments" in lines[-1], err
    else:
        assert len(lines) == 1, (argv, err)
    assert _snapshot(tree) == before, f"{argv} changed files"
    assert not (tree / "new").exists() and not (tree / "new.jsonl").exists(), f"{argv} created its output"
