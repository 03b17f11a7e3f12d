"""`nanoseek chat`: an interactive loop over the engine, streaming tokens, the <think> part shown dimmed.

Ctrl-C stops the reply being written (the conversation stays as it was before that question); at the prompt
it only clears the line. Ctrl-D or /exit leaves; /help lists the commands. Line editing and history come from
readline when the terminal has it. When the checkpoint's run recorded its task (evaluation.trained_on), the
start says so and shows a question in that task's own format (/example asks it): a small model trained only on
"State the final answer to the following arithmetic problem: 3 + 4 =" cannot answer "What is 3 + 4?"."""

from __future__ import annotations

import json
import sys

from .engine import Engine, SamplingParams
from .template import CHAT_STOP, END_ANSWER, END_THINK, THINK, conversation, split_reasoning

DIM, RESET = "\033[2m", "\033[0m"
MIN_PROMPT = 16  # tokens a turn needs at least (template + a short question)
HELP = """commands:
  /reset   start a new conversation
  /example ask the example question (in the format of the task the model was trained on)
  /help    this list
  /exit    leave (Ctrl-D does the same)
Ctrl-C stops a reply while it is being written."""


class _Printer:
    """Prints the decoded text as it grows; dims everything between <think> and </think> on a terminal."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], ""
        self.color = self.out.isatty()
        self.in_think = True  # the prompt ends with <think>

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return
        delta, self.shown = text[len(self.shown):], text
        if self.color and self.in_think and END_THINK in delta:
            head, tail = delta.split(END_THINK, 1)
            delta, self.in_think = f"{DIM}{head}{END_THINK}{RESET}{tail}", False
        elif self.color and self.in_think:
            delta = f"{DIM}{delta}{RESET}"
        self.out.write(delta)
        self.out.flush()


def check_settings(params: SamplingParams, context: int) -> None:
    """ValueError, before the first turn, for settings no conversation could run with."""
    if params.max_new_tokens > context - MIN_PROMPT:
        raise ValueError(f"--max-new-tokens {params.max_new_tokens} leaves no room for a question in the model's "
                         f"{context}-token context (at most {context - MIN_PROMPT})")


def _line_editing() -> None:
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # not every Python build has it
            pass


def intro(trained_on: dict | None) -> str:
    """What the model was trained on and a question in that format, or "" when its run recorded no task."""
    if not trained_on:
        return ""
    lines = [f"trained on: {trained_on['task']} {json.dumps(trained_on['task_args'])} ({trained_on['source']})"]
    if trained_on.get("example"):
        lines.append(f"try (/example): {trained_on['example']}")
    return "\n".join(lines)


def chat(model, tokenizer, params: SamplingParams, speculative: bool = False, read=None,
         trained_on: dict | None = None) -> None:
    """Talk to the model in the R1 chat template (template.conversation, as the server uses); earlier turns
    keep their answers and drop their reasoning, and the oldest turns go when the context is full.
    `trained_on` (evaluation.trained_on) is shown at the start, its example question asked by /example."""
    check_settings(params, model.cfg.max_seq_len)
    engine = Engine(model, tokenizer)
    params.stop = list(params.stop) + CHAT_STOP
    messages: list[dict] = []
    if read is None:  # the terminal's own input() (looked up now, so tests can replace it)
        read = input
        _line_editing()
    print("nanoseek chat — /help lists the commands, Ctrl-D or /exit leaves.", file=sys.stderr)
    if intro(trained_on):
        print(intro(trained_on), file=sys.stderr)
    example = (trained_on or {}).get("example")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the conversation
            print("\n(Ctrl-D or /exit leaves)", file=sys.stderr)
            continue
        if line == "/example" and example:
            print(f"you> {example}", file=sys.stderr)
            line = example
        elif line.startswith("/"):
            if _command(line, messages):
                return
            continue
        if not line:
            continue
        pending = messages + [{"role": "user", "content": line}]  # _turn may drop its oldest turns to fit
        reply = _turn(engine, tokenizer, pending, params, speculative)
        if reply is not None:
            messages[:] = pending + [{"role": "assistant", "content": reply}]


def _command(line: str, messages: list[dict]) -> bool:
    """Run a /command; True means leave."""
    if line in ("/exit", "/quit"):
        return True
    if line == "/reset":
        messages.clear()
        print("(conversation cleared)", file=sys.stderr)
    elif line == "/help":
        print(HELP, file=sys.stderr)
    else:
        print(f"(unknown command {line.split()[0]}; /help lists the commands)", file=sys.stderr)
    return False


def _turn(engine: Engine, tokenizer, messages: list[dict], params: SamplingParams, speculative: bool) -> str | None:
    """Stream one reply; its answer, or None when Ctrl-C stopped it (the question is then forgotten)."""
    ids = _fit(tokenizer, messages, engine.model.cfg.max_seq_len - params.max_new_tokens - 2)
    printer = _Printer(tokenizer)
    sys.stdout.write(f"assistant> {DIM if printer.color else ''}{THINK}{RESET if printer.color else ''}")
    try:
        out = engine.generate([ids], params, speculative=speculative, on_token=printer)[0]
    except KeyboardInterrupt:
        print(RESET if printer.color else "")
        print("(reply stopped; the conversation is as it was before this question)", file=sys.stderr)
        return None
    print(END_ANSWER if out.finish_reason == "stop" and not printer.shown.endswith(END_ANSWER) else "")
    return split_reasoning(out.text)[1]


def _fit(tokenizer, messages: list[dict], room: int) -> list[int]:
    """The prompt of the conversation in at most `room` tokens: the oldest exchanges are dropped first (saying
    so), and a single message that is still too long keeps its end."""
    while True:
        ids = tokenizer.encode(conversation(messages))
        if len(ids) <= room:
            return ids
        if len(messages) > 1:
            del messages[:2]  # the oldest user turn and its reply
            print("(older conversation dropped to fit the context)", file=sys.stderr)
        else:
            print("(message shortened to fit the context)", file=sys.stderr)
            return ids[-room:]
