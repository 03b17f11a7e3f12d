"""Where a chain_sum teacher's worked solution goes wrong: copying or arithmetic (docs/results/teacher-recipe.md).

A cold-started teacher writes "First, a ± b = v, so it becomes v ± c ± d." and then one "Then …" line per step.
Its greedy solutions to N four-term sums (training-split generator, a fixed seed) are checked operation by
operation: the first pair copied from the question, the tail copied from the question, every later line starting
from the line above (its running value and the next term), and every step's arithmetic.

    python bench/copy_diagnosis.py runs/speedrun/coldstart [more checkpoints]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEP = re.compile(r"(-?\d+) ([+-]) (-?\d+) = (-?\d+)")
LINE = re.compile(r"(?:First,|Then) (-?\d+) ([+-]) (-?\d+) = (-?\d+)(?:, so it becomes (.*?))?\.\n")


def score(question: str, answer: str, text: str, c: dict) -> None:
    """Add one solution's operations to the counters c."""
    terms = re.search(r"problem: (.*) =", question).group(1).split()
    lines = LINE.findall(text)
    if lines:
        a, op, b, v, becomes = lines[0]
        c["first"] += f"{a} {op} {b}" == " ".join(terms[:3])
        c["tail"] += becomes == " ".join([v, *terms[3:]])
    for (_, _, _, v1, bec1), (a2, o2, b2, _, _) in zip(lines, lines[1:]):
        c["later_n"] += 1
        c["later"] += bec1.startswith(f"{v1} ") and f"{a2} {o2} {b2}" == " ".join(bec1.split()[:3])
    for a, op, b, v in STEP.findall(text):
        c["steps_n"] += 1
        c["steps"] += (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(v)
    c["right"] += text.split("<answer>")[-1].split("</answer>")[0].strip() == answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", nargs="+", help="cold-started teacher checkpoints (or run directories)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=777, help="the problems' generator seed")
    args = ap.parse_args()
    from nanoseek import load
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.tasks.registry import get_task
    from nanoseek.template import r1_prompt

    problems = get_task("chain_sum", min_terms=4, max_terms=4, min_digits=1, max_digits=1).generate(args.seed, args.n)
    for ckpt in args.ckpt:
        model, tok = load(ckpt)
        gens = Engine(model, tok).generate([r1_prompt(p.question) for p in problems],
                                           SamplingParams(temperature=0, max_new_tokens=96))
        c = dict.fromkeys(("first", "tail", "later", "later_n", "steps", "steps_n", "right"), 0)
        for p, g in zip(problems, gens):
            score(p.question, p.answer, g.text, c)
        n = len(problems)
        print(f"{ckpt}: first pair copied {c['first']}/{n}, tail copied {c['tail']}/{n}, later lines from the line "
              f"above {c['later']}/{c['later_n']}, arithmetic steps right {c['steps']}/{c['steps_n']}, greedy answer "
              f"right {c['right']}/{n}")


if __name__ == "__main__":
    main()
