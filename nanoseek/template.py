"""The R1 prompt/completion format: tags, the prompt a model completes, stop strings, and the reasoning split.

DeepSeek-R1-Zero's template (R1 paper, Table 1) asks for `<think> reasoning </think> <answer> answer </answer>`
after a preamble that explains the format. nanoseek keeps the format and drops the preamble by default: for
the models this project trains (a few million parameters, 256-token contexts) the R1 preamble is ~70 words
(85 tokens with the speedrun's 4,096-entry tokenizer) in front of a ~23-token question and a ~43-token
answer. It would be most of every prompt's compute and of every pretraining document, yet it carries no
information a small model can use (every document repeats it verbatim; the format is learnt from the worked
examples themselves). `r1_prompt(q, preamble=R1_PREAMBLE)` restores it for models large enough to read it.
One module owns the format, so that the corpus, the tasks' prompts, GRPO, rejection sampling, evaluation,
`chat` and the server all speak the same one:

    prompt = r1_prompt("What is 3 + 4?")                  # ends with "<think>": the model writes the reasoning
    text = prompt + r1_completion("3 + 4 = 7.", "7")       # a well-formed training document
    conversation([{"role": "user", "content": "hi"}])      # multi-turn chat in the same format
    split_reasoning(" 3 + 4 = 7. </think> <answer> 7 </answer>")   # -> ("3 + 4 = 7.", "7")
    split_reasoning(" 3 + 4 = 7. </thi", partial=True)                # -> ("3 + 4 = 7.", ""): streaming
"""

from __future__ import annotations

from typing import NamedTuple

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)

USER, ASSISTANT = "User: ", "Assistant: "

# The R1-Zero training template's preamble, in our words: no hints about how to reason, only the format.
# Not used by default (see above).
R1_PREAMBLE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process and then gives the answer. The reasoning "
    "process and the answer are enclosed in <think> </think> and <answer> </answer> tags: "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)

# A completion is finished once its answer block closes; a new "User:" turn also ends a chat reply.
STOP = [END_ANSWER]
CHAT_STOP = [END_ANSWER, "\nUser:"]


def r1_prompt(question: str, preamble: str = "") -> str:
    """The prompt a model completes: (preamble,) question, and the opening <think> tag."""
    head = f"{preamble.strip()}\n" if preamble else ""
    return f"{head}{USER}{question.strip()}\n{ASSISTANT}{THINK}"


def r1_completion(think: str, answer: str) -> str:
    """What follows r1_prompt in a well-formed response."""
    return f" {think.strip()} {END_THINK} {ANSWER} {answer.strip()} {END_ANSWER}"


def conversation(messages: list[dict]) -> str:
    """A chat (OpenAI-style messages: role system/user/assistant, content) as one prompt ending in "<think>".

    A system message becomes the first line (there is none by default, as in r1_prompt); earlier assistant
    turns are shown with their answers (their reasoning is dropped, as R1's multi-turn template does), so the
    context holds what the user saw."""
    preamble, turns = "", []
    for m in messages:
        role, content = m["role"], str(m["content"]).strip()
        if role == "system":
            preamble = content
        elif role == "user":
            turns.append(f"User: {content}")
        elif role == "assistant":
            turns.append(f"Assistant: {THINK} {END_THINK} {ANSWER} {content} {END_ANSWER}")
        else:
            raise ValueError(f"unknown message role {role!r} (system, user or assistant)")
    if not turns or not turns[-1].startswith("User:"):
        raise ValueError("a conversation must end with a user message")
    return "\n".join([preamble, *turns] if preamble else turns) + f"\nAssistant: {THINK}"


def held_suffix(text: str, words) -> int:
    """Length of the longest end of `text` that some word starts with but does not complete: text a stream
    must hold back, since the next characters may turn it into one of the words."""
    for n in range(min(len(text), max((len(w) for w in words), default=1) - 1), 0, -1):
        if any(len(w) > n and w.startswith(text[-n:]) for w in words):
            return n
    return 0


def split_reasoning(completion: str, partial: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a completion that follows "<think>": the reasoning is the text before "</think>",
    the answer the inside of <answer> … </answer> (or everything after "</think>" when there is no answer tag).
    A completion that never closes its thinking is all reasoning.

    partial=True is for a completion still being generated: it returns what is already certain, prefixes of
    what the finished completion will give (whitespace and tag beginnings at the end are held back), so a
    stream can send the growth of each part as it comes."""
    if END_THINK not in completion:
        if partial:
            completion = completion[: len(completion) - held_suffix(completion, [END_THINK])]
        return completion.strip(), ""
    reasoning, rest = completion.split(END_THINK, 1)
    rest = rest.lstrip() if partial else rest.strip()
    if partial and ANSWER.startswith(rest):  # nothing yet, or the answer tag is still arriving
        return reasoning.strip(), ""
    if rest.startswith(ANSWER):
        rest = rest[len(ANSWER):]
        if partial and END_ANSWER not in rest:
            rest = rest[: len(rest) - held_suffix(rest, [END_ANSWER])]
        rest = rest.split(END_ANSWER, 1)[0]
    return reasoning.strip(), rest.strip()


class Sampling(NamedTuple):
    temperature: float
    top_p: float


# The one sampling default for a trained reasoning model: eval, generate, chat, the API and the chat page all
# read it, so a question asked on the page is sampled the way the model's scores were measured. R1's evaluation
# setting (arXiv 2501.12948 §3): low enough to avoid the repetition and incoherence of 1.0, not greedy.
R1_SAMPLING = Sampling(temperature=0.6, top_p=0.95)
