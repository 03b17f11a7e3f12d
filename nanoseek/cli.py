"""The `nanoseek` command: one subcommand per stage, each with its flags generated from one config dataclass.

Every command's flags, defaults, choices and ranges are declared once, on its config dataclass (options.option),
in the module that runs it; this file only turns them into argparse flags and draws one error boundary:
- a user mistake (a bad value, a bad path or file, a refused overwrite) prints one line naming the thing at fault
  and exits with status 2; an unknown flag or a missing required one also prints the command's usage;
- Ctrl-C prints one line and exits with status 130 (long stages save what they can first and say so);
- anything else is a bug and keeps its traceback.
Only the chosen command's module is imported, so `nanoseek --help` starts without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

from .errors import StageError

# command: (module under nanoseek, config class, function, one-line help)
COMMANDS = {
    "stats": ("stages.tools", "StatsConfig", "stats", "parameters, KV cache and training FLOPs of a preset or checkpoint"),
    "cost": ("stages.tools", "CostConfig", "cost", "GPU-hours and dollars of a training run"),
    "pretrain": ("stages.pretrain", "PretrainConfig", "run", "pretrain a model (MLA + DeepSeekMoE + MTP) on the "
                 "embedded corpus or --data"),
    "grpo": ("stages.grpo", "GRPOConfig", "run", "reinforcement learning with rule rewards (GRPO, Dr. GRPO, DAPO)"),
    "sample": ("stages.sample", "SampleConfig", "run", "rollouts to JSONL; --keep correct for rejection sampling"),
    "sft": ("stages.sft", "SFTConfig", "run", "supervised fine-tuning / distillation on traces"),
    "distill": ("stages.distill", "DistillConfig", "run", "on-policy distillation: the student samples, a teacher "
                "scores every token (reverse KL)"),
    "eval": ("stages.evaluate", "EvalConfig", "run", "held-out pass@1 / cons@k / response length on a task"),
    "generate": ("stages.generate", "GenerateConfig", "generate", "complete prompts with a checkpoint"),
    "chat": ("stages.generate", "ChatConfig", "chat", "talk to a checkpoint (R1 template, streamed)"),
    "serve": ("stages.serve", "ServeConfig", "run", "OpenAI-compatible server with continuous batching, and a chat page at /"),
    "import": ("stages.tools", "ImportConfig", "import_hf", "Hugging Face DeepSeek checkpoint -> nanoseek checkpoint"),
    "export": ("stages.tools", "ExportConfig", "export_hf", "nanoseek checkpoint -> Hugging Face checkpoint"),
    "speedrun": ("stages.speedrun", "SpeedrunConfig", "run", "the whole recipe end to end, ending in OUT/report.md"),
}
# one runnable example per command, shown at the end of its --help (the run directories are a speedrun's)
EXAMPLES = {
    "stats": "nanoseek stats deepseek-v3 --compare",
    "cost": "nanoseek cost deepseek-v3 --tokens 14.8T --gpu h800",
    "pretrain": "nanoseek pretrain --preset mini --out runs/mini --steps 300 --seq-len 256 --batch-size 32",
    "grpo": "nanoseek grpo --init runs/speedrun/coldstart --out runs/my-grpo --task chain_sum "
            "--task-args '{\"min_terms\": 4, \"max_terms\": 4, \"max_digits\": 1}' --steps 60",
    "sample": "nanoseek sample --ckpt runs/speedrun/rl --task chain_sum --out traces.jsonl --n 100 --keep correct",
    "sft": "nanoseek sft --init runs/speedrun/student-cold --data runs/speedrun/traces.jsonl --out runs/my-sft",
    "distill": "nanoseek distill --init runs/speedrun/student-cold --teacher runs/speedrun/rl --task chain_sum "
               "--out runs/my-distill --steps 50",
    "eval": "nanoseek eval --ckpt runs/speedrun/rl --n 200",
    "generate": "nanoseek generate --ckpt runs/speedrun/rl --prompt "
                "'State the final answer to the following arithmetic problem: 3 + 4 - 2 ='",
    "chat": "nanoseek chat --ckpt runs/speedrun/rl",
    "serve": "nanoseek serve --ckpt runs/speedrun/rl --port 8000",
    "import": "nanoseek import path/to/DeepSeek-V3-hf runs/imported",
    "export": "nanoseek export --ckpt runs/speedrun/rl exports/rl",
    "speedrun": "nanoseek speedrun --out runs/speedrun",
}
_LAST = ("device", "precision", "threads")  # the shared compute options are listed after a command's own


class _ExampleFormatter(argparse.HelpFormatter):
    """Reflows the description as usual but prints the epilog (the example command) as written."""

    def _fill_text(self, text, width, indent):
        return text if text.startswith("example:") else super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line for a bad value; the usage too when the flags themselves are wrong."""
        if message.startswith(("unrecognized arguments", "the following arguments are required")):
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------- flags from a dataclass


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}  # "14.8T" tokens, "2B" parameters


def _number(kind):
    def parse(text: str):
        try:
            if kind is float and text[-1:] in _SUFFIX:
                return float(text[:-1]) * _SUFFIX[text[-1]]
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if value in ("", [], None):
        return "none"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of `cls` (see options.option); every default shows as '(default: …)'."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
    fields.sort(key=lambda f: (not f.metadata.get("positional", False), f.name in _LAST))
    for f in fields:
        m = f.metadata
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = m.get("help", "").replace("%", "%%")
        if not required and "(default:" not in help_text:  # a help that names its default says it once
            help_text += f" (default: {_default_text(f)})"
        kind = str(f.type)
        kw: dict = {"help": help_text, "default": argparse.SUPPRESS}
        if m.get("choices"):
            kw["choices"] = m["choices"]
            if "" in m["choices"]:  # "" means "unset" (the help says whose default applies): not a value to show
                kw["metavar"] = "{" + ",".join(c for c in m["choices"] if c) + "}"
        if kind == "bool":
            kw["action"] = "store_true"
        elif kind.startswith("list"):
            kw.update(nargs="+", metavar=m.get("metavar") or "PATH")
        elif kind == "dict":
            kw.update(type=_json_object, metavar="JSON")
        else:
            kw["type"] = {"int": _number(int), "float": _number(float)}.get(kind, str)
            if m.get("metavar") or kind in ("int", "float"):
                kw["metavar"] = m.get("metavar") or ("N" if kind == "int" else "X")
        if m.get("positional"):
            kw.pop("default")
            if not required:
                kw.update(nargs="?", default=argparse.SUPPRESS)
            parser.add_argument(f.name, **kw)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, required=required, **kw)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the command named in argv (if any) gets its flags, so other modules stay unimported."""
    p = _Parser(prog="nanoseek", description="The DeepSeek-V3 / R1 recipe in small, tested PyTorch. "
                "`nanoseek COMMAND --help` lists a command's flags.")
    p.add_argument("--version", action="version", version=f"nanoseek {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, cls_name, _, help_text) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_text)
            continue
        cls = getattr(importlib.import_module(f".{module}", __package__), cls_name)
        description = inspect.cleandoc(cls.__doc__ or help_text)
        cp = sub.add_parser(name, help=help_text, description=description, epilog=f"example:\n  {EXAMPLES[name]}",
                            formatter_class=_ExampleFormatter)
        add_config_arguments(cp, cls)
        p.chosen = cp
    return p


def make_config(cls, given: dict):
    """The command's config from the flags given; a class with `from_cli` (e.g. a resumable stage) builds its own."""
    if hasattr(cls, "from_cli"):
        return cls.from_cli(given)
    return cls(**given)


# ----------------------------------------------------------------------------- the error boundary


def _raised_by_nanoseek(e: BaseException) -> bool:
    """A ValueError raised by nanoseek's own code is a diagnosed user mistake; one from elsewhere is a bug."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    package = str(Path(__file__).resolve().parent)
    return last is not None and str(Path(last.tb_frame.f_code.co_filename).resolve()).startswith(package)


def _os_error_line(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the command's own parser, so its usage is the one shown
            getattr(parser, "chosen", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # argparse's own exits: --help, --version (0) and flag errors (2)
        return e.code if isinstance(e.code, int) else 2
    if not args.command:
        parser.print_help()
        return 2
    module, cls_name, fn_name, _ = COMMANDS[args.command]
    prog = f"nanoseek {args.command}"
    given = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        mod = importlib.import_module(f".{module}", __package__)
        result = getattr(mod, fn_name)(make_config(getattr(mod, cls_name), given))
        if isinstance(result, Path):  # a checkpoint directory, or a file (the speedrun's report)
            print(f"{'final checkpoint' if result.is_dir() else 'wrote'}: {result}", file=sys.stderr)
        return 0
    except KeyboardInterrupt as e:  # an Interrupted from a stage says what it saved
        print(f"\n{prog}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nanoseek … | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except StageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        if not _raised_by_nanoseek(e):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
