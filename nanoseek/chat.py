"""`nanoseek chat`: an interactive loop over the engine, streaming tokens, the <think> part shown dimmed."""

from __future__ import annotations

import sys

from .engine import Engine, SamplingParams
from .template import CHAT_STOP, END_ANSWER, END_THINK, THINK, conversation, split_reasoning

DIM, RESET = "\033[2m", "\033[0m"


class _Printer:
    """Prints the decoded text as it grows; dims everything between <think> and </think> on a terminal."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""
        self.color = out.isatty()
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


def chat(model, tokenizer, params: SamplingParams, speculative: bool = False, read=input) -> None:
    """Talk to the model in the R1 chat template (template.conversation, as the server uses); earlier turns
    keep their answers and drop their reasoning, and the oldest turns go when the context is full."""
    engine = Engine(model, tokenizer)
    params.stop = list(params.stop) + CHAT_STOP
    messages: list[dict] = []
    print("nanoseek chat — /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = _fit(tokenizer, messages, model.cfg.max_seq_len - params.max_new_tokens - 2)
        printer = _Printer(tokenizer)
        sys.stdout.write(f"assistant> {DIM if printer.color else ''}{THINK}{RESET if printer.color else ''}")
        out = engine.generate([ids], params, speculative=speculative, on_token=printer)[0]
        print(END_ANSWER if out.finish_reason == "stop" and not printer.shown.endswith(END_ANSWER) else "")
        messages.append({"role": "assistant", "content": split_reasoning(out.text)[1]})


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
