"""Where a chain_sum model goes wrong: greedy worked solutions, each failure put in one class.

A worked solution of "6 - 8 - 7 =" reads "6 - 8 = -2, so it becomes -2 - 7.\\n-2 - 7 = -9.": the first step copies
two terms and adds them, "so it becomes" copies the running value and the next term, the next line adds again.
This bench decodes greedily on held-out and on training-split problems and reports, per split, how many answers
are right and which step each wrong one broke first:

  step1  the first sum is wrong (or its terms were misread)
  copy   a term after "so it becomes" is not the question's next term (or its sign is wrong)
  step   a later sum is wrong
  form   the solution does not have the worked-solution shape, or its final answer differs from its last step

A model that is wrong on training questions as often as on held-out ones has not learned a step; one that is
right on training questions only has memorised them (docs/results/r1-zero.md used this to find the speedrun's
failure: the wrong third term).

    python bench/chain_sum_errors.py --ckpt runs/speedrun/coldstart --n 200

Last line: heldout_ok=… heldout_copy=… train_ok=… train_copy=… (fractions of --n)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.runtime import prepare_inference, resolve, set_threads  # noqa: E402
from nanoseek.checkpoint import load  # noqa: E402
from nanoseek.tasks import extract_answer, get_task  # noqa: E402
from nanoseek.template import STOP  # noqa: E402

SPEEDRUN_TASK = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}
_STEP = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)(?:, so it becomes ([-+\d ]+))?\.")


def expression(question: str) -> list:
    """[a, op, b, op, c, ...] of 'State the final answer to the following arithmetic problem: a op b op c ='."""
    return [t if t in ("+", "-") else int(t) for t in question.rsplit(":", 1)[-1].rstrip(" =").split()]


def classify(question: str, completion: str, answer: str) -> str:
    """'ok', or the first broken step: 'step1', 'copy', 'step' or 'form' (module docstring)."""
    if extract_answer(completion) == answer:  # the verifier's own reading of the answer
        return "ok"
    tokens = expression(question)
    value, rest = tokens[0], tokens[1:]
    steps = _STEP.findall(completion)
    for i, (a, op, b, result, becomes) in enumerate(steps):
        if not rest:
            return "form"  # more steps than the question has terms
        if (int(a), op, int(b)) != (value, rest[0], rest[1]):
            return "step1" if i == 0 else "copy"  # a later line restates what "so it becomes" wrote
        value = value + rest[1] if rest[0] == "+" else value - rest[1]
        if int(result) != value:
            return "step1" if i == 0 else "step"
        rest = rest[2:]
        if rest and not becomes:
            return "form"
        if rest and becomes.split() != [str(value), *map(str, rest)]:
            return "copy"
    return "form"  # no steps, a step missing, or every step right and the final answer missing or different


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    ap.add_argument("--task-args", type=json.loads, default=dict(SPEEDRUN_TASK), help="chain_sum options (JSON)")
    ap.add_argument("--n", type=int, default=200, help="problems per split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--show", type=int, default=3, help="print this many wrong held-out solutions")
    args = ap.parse_args()
    set_threads(args.threads)
    task = get_task("chain_sum", **args.task_args)
    model, tokenizer = load(args.ckpt, require_tokenizer=True)
    model = prepare_inference(model, resolve("auto", "auto", rows=args.n))
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=96, temperature=0.0, stop=list(STOP))
    line = []
    for split in ("heldout", "train"):
        problems = task.problems(args.seed, args.n, split=split)
        outs = engine.generate([task.prompt(p) for p in problems], params)
        classes = [classify(p.question, o.text, p.answer) for p, o in zip(problems, outs)]
        counts = Counter(classes)
        print(f"{split}: " + "  ".join(f"{c} {counts[c]}" for c in ("ok", "step1", "copy", "step", "form")))
        if split == "heldout":
            wrong = [(p, o.text) for p, o, c in zip(problems, outs, classes) if c != "ok"][:args.show]
            for p, text in wrong:
                print(f"  {p.question.rsplit(':', 1)[-1].strip()} -> {text.strip()!r}")
        line += [f"{split}_ok={counts['ok'] / len(problems):.3f}", f"{split}_copy={counts['copy'] / len(problems):.3f}"]
    print(" ".join(line))


if __name__ == "__main__":
    main()
