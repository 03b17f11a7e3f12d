"""The speedrun's experiment: its rungs, its models, the comparisons it draws, and results.json.

The speedrun (stages/speedrun.py) runs the stages; this module says what they are for. The report
(report.py) renders results.json and knows none of the names here.

Rungs of chain_sum (one-digit terms; the number of terms is the difficulty knob):
- pretraining and the cold start see RUNGS["pretrain"];
- GRPO, R1-Zero, rejection sampling and every student arm train on RUNGS["rl"], the rung where the cold-started
  teacher is at the edge of its competence; its held-out split (by signed-term multiset, tasks/base.py) is the
  held-out set;
- RUNGS["ood"] has more terms than any training problem of any stage: the out-of-distribution set.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

ONE_DIGIT = {"min_digits": 1, "max_digits": 1}
RUNGS = {
    "pretrain": {"task_args": {"min_terms": 2, "max_terms": 4, **ONE_DIGIT}, "what": "sums of 2-4 one-digit terms"},
    "rl": {"task_args": {"min_terms": 4, "max_terms": 4, **ONE_DIGIT}, "what": "sums of 4 one-digit terms",
           "max_new_tokens": 96},
    "ood": {"task_args": {"min_terms": 5, "max_terms": 5, **ONE_DIGIT}, "what": "sums of 5 one-digit terms",
            "max_new_tokens": 144},
}

# Budget 1 on 2 CPU cores. "scaled" lists the entries --budget multiplies.
PLAN = {
    "vocab_size": 1024, "seq_len": 256, "batch": 16, "warmup_frac": 0.04, "natural_share": 0.2, "n_problems": 2000,
    "task_docs": 30000, "pretrain": 400, "cold_n": 4000, "cold_lr": 1e-3,
    # pretraining: a constant rate after the warm-up (the cold start is the decay phase), batches of 16 × 256
    # tokens, packed documents masked from each other: the copying skill the task needs appeared in 400 such steps
    # where 300 steps of 32 unmasked rows (1.5× the tokens) missed it on one seed of three (docs/results/r1-seeds.md)
    "pretrain_decay": (1.0, 1.0), "document_mask": True,
    "rl_steps": 40, "r1_zero_steps": 40, "rl_eval_every": 20, "rl_eval_n": 64, "sample_n": 400,
    "student_flops": 1.0e12, "distill_lr": 1e-3, "onpolicy_lr": 1e-3, "eval_n": 200, "eval_k": 4,
    "scaled": ("task_docs", "pretrain", "cold_n", "rl_steps", "r1_zero_steps", "sample_n"),
}

# The student is pretrained on the teacher's data for a number of tokens in proportion to its size: the teacher's
# tokens × (student active parameters / teacher active parameters), the compute-optimal rule's D ∝ N (Hoffmann et
# al. 2022), so both see the same tokens per parameter.
STUDENT_TOKENS_RULE = "teacher tokens × student active params / teacher active params"

# GRPO settings of every RL stage (teacher, R1-Zero, student arm (a)); docs/rl.md says why.
RL_ARGS = ["--algo", "grpo", "--lr", "2e-5", "--temperature", "1.0", "--warmup-steps", "5", "--prompts-per-step",
           "8", "--group-size", "8", "--max-new-tokens", str(RUNGS["rl"]["max_new_tokens"])]


@dataclass(frozen=True)
class Model:
    """A model the speedrun evaluates: its results.json key, run directory, label, the stages from scratch to it
    (the last one trained it), the run directory it started from, and whether it is the teacher's or the student's."""

    key: str
    dir: str
    label: str
    lineage: tuple[str, ...]
    init: str | None
    role: str


_S = ("student-pretrain", "student-coldstart")
MODELS = [
    Model("pretrained", "base", "teacher, pretrained only", ("pretrain",), None, "teacher"),
    Model("teacher_base", "coldstart", "teacher base: pretrained + cold start", ("pretrain", "coldstart"), "base",
          "teacher"),
    Model("teacher_rl", "rl", "teacher + GRPO", ("pretrain", "coldstart", "grpo"), "coldstart", "teacher"),
    Model("r1_zero", "r1-zero", "R1-Zero: GRPO from the pretrained base", ("pretrain", "r1-zero"), "base", "teacher"),
    Model("student_base", "student-cold", "student base: pretrained + cold start", _S, "student-base", "student"),
    Model("student_rl", "student-rl", "(a) student + GRPO", (*_S, "student-grpo"), "student-cold", "student"),
    Model("student_distilled", "distilled", "(b) student SFT on the RL teacher's traces", (*_S, "distill"),
          "student-cold", "student"),
    Model("student_control", "control", "(c) student SFT on generated solutions (control)", (*_S, "control"),
          "student-cold", "student"),
    Model("student_onpolicy", "onpolicy", "(d) student on-policy distillation", (*_S, "onpolicy"), "student-cold",
          "student"),
]

# (a, b, what a − b measures): each drawn on the held-out and on the OOD set.
COMPARISONS = [
    ("teacher_rl", "teacher_base", "GRPO on the cold-started teacher (teacher + GRPO − teacher base)"),
    ("r1_zero", "pretrained", "R1-Zero (GRPO from the pretrained base − that base)"),
    ("student_distilled", "student_rl", "Distillation beats RL on the student: (b) traces − (a) GRPO"),
    ("student_onpolicy", "student_rl", "Distillation beats RL on the student: (d) on-policy − (a) GRPO"),
    ("student_distilled", "student_control", "The RL teacher's traces vs generated solutions: (b) − (c)"),
    ("student_onpolicy", "student_control", "On-policy distillation vs generated solutions: (d) − (c)"),
    ("student_rl", "student_base", "GRPO on the student ((a) − student base)"),
]


def cold_start_rows(n: int, seed: int) -> list[dict]:
    """The cold start (R1 §2.3.1): verified worked solutions of training-split problems of the pretraining rungs."""
    from ..corpus import worked_solutions

    return worked_solutions("chain_sum", n, seed=seed, **RUNGS["pretrain"]["task_args"])


def control_rows(traces: Path) -> list[dict]:
    """Arm (c)'s data: for every rejection-sampled trace, the generator's worked solution of the same question:
    as many examples, the same problems, only the text differs from (b)'s."""
    from ..corpus import worked_solution
    from ..template import r1_completion

    rows = []
    for line in traces.read_text().splitlines():
        t = json.loads(line)
        think, answer = worked_solution(t["question"])
        rows.append({"prompt": t["prompt"], "completion": r1_completion(think, answer), "question": t["question"],
                     "answer": answer})
    return rows


# ----------------------------------------------------------------------------- results.json


def _eval(out: Path, split: str, key: str) -> dict | None:
    path = out / "eval" / split / f"{key}.json"
    return json.loads(path.read_text()) if path.exists() else None


def weights_moved(out: Path, model: Model) -> float | None:
    """‖θ − θ_init‖ / ‖θ_init‖ over the tensors both checkpoints hold (None for a model trained from scratch)."""
    if model.init is None:
        return None
    from safetensors.numpy import load_file

    from .. import checkpoint as ckpt

    a = load_file(str(ckpt.resolve(out / model.init) / "model.safetensors"))
    b = load_file(str(ckpt.resolve(out / model.dir) / "model.safetensors"))
    num = sum(float(((b[k].astype("float64") - a[k]) ** 2).sum()) for k in a if k in b)
    den = sum(float((a[k].astype("float64") ** 2).sum()) for k in a if k in b)
    return (num / den) ** 0.5 if den else None


def _stage_flops(out: Path, directory: str) -> float:
    """Training FLOPs a stage logged: pretraining's tokens × per-token FLOPs, the others' flops_total."""
    from ..metrics import read_metrics

    records = read_metrics(out / directory / "metrics.jsonl")
    last = next((r for r in reversed(records) if "flops_total" in r or "tokens" in r), {})
    if "flops_total" in last:
        return float(last["flops_total"])
    if "tokens" in last and (out / directory).exists():
        from .. import checkpoint as ckpt
        from ..stats import train_flops_per_token

        return float(last["tokens"]) * train_flops_per_token(ckpt.read_config(out / directory), PLAN["seq_len"])
    return 0.0


def _model_record(out: Path, m: Model, timings: dict) -> dict | None:
    from .. import checkpoint as ckpt
    from ..evaluation import pass1_se
    from ..stats import param_counts

    held, ood = _eval(out, "heldout", m.key), _eval(out, "ood", m.key)
    if held is None:
        return None
    counts = param_counts(ckpt.read_config(out / m.dir))
    dirs = {mm.lineage[-1]: mm.dir for mm in MODELS} | {"student-pretrain": "student-base"}
    r = {"label": m.label, "role": m.role, "params_total": counts["total_params"],
         "params_active": counts["active_params"], "trained": m.lineage[-1],
         "wall_s": round(timings.get(m.lineage[-1], 0.0), 1),
         "wall_s_lineage": round(sum(timings.get(s, 0.0) for s in m.lineage), 1),
         "flops": _stage_flops(out, m.dir), "flops_lineage": sum(_stage_flops(out, dirs[s]) for s in m.lineage),
         "weights_moved": weights_moved(out, m),
         "pass1": held["accuracy"], "pass1_se": pass1_se(held["problems"]), "cons": held["cons_at_k"],
         "format": held["format"], "response_tokens": held["mean_response_tokens"], "n": held["n"], "k": held["k"]}
    if ood is not None:
        r.update(ood_pass1=ood["accuracy"], ood_pass1_se=pass1_se(ood["problems"]), ood_format=ood["format"])
    return r


def _comparisons(out: Path) -> list[dict]:
    from ..evaluation import paired_difference

    rows = []
    for a, b, claim in COMPARISONS:
        for split in ("heldout", "ood"):
            ea, eb = _eval(out, split, a), _eval(out, split, b)
            if ea is not None and eb is not None:
                rows.append({**paired_difference(ea["problems"], eb["problems"], a, b), "set": split, "claim": claim})
    return rows


def _curves() -> dict:
    """The report's training curves: which metrics files, which key, smoothed over how many steps."""
    rl = {"teacher + GRPO": "rl/metrics.jsonl", "R1-Zero": "r1-zero/metrics.jsonl",
          "(a) student + GRPO": "student-rl/metrics.jsonl"}
    return {
        "pretrain_loss": {"runs": {"teacher (MoE)": "base/metrics.jsonl", "student (dense)": "student-base/metrics.jsonl"},
                          "key": "loss", "title": "Pretraining loss", "ylabel": "next-token loss", "window": 10},
        "rl_accuracy": {"runs": rl, "key": "accuracy", "points": "heldout_accuracy", "window": 10,
                        "title": f"GRPO on {RUNGS['rl']['what']}: rollout accuracy and held-out greedy pass@1",
                        "ylabel": "accuracy"},
        "rl_length": {"runs": rl, "key": "response_len", "window": 10, "title": "GRPO: mean response length",
                      "ylabel": "tokens"},
        "onpolicy_kl": {"runs": {"(d) on-policy distillation": "onpolicy/metrics.jsonl"}, "key": "loss",
                        "window": 10, "title": "On-policy distillation: reverse KL to the teacher per token",
                        "ylabel": "KL (nats / token)"},
        "student_sft_loss": {"runs": {"(b) RL teacher's traces": "distilled/metrics.jsonl",
                                      "(c) generated solutions": "control/metrics.jsonl"},
                             "key": "loss", "window": 10, "title": "Student SFT loss", "ylabel": "loss"},
    }


def _host() -> str:
    from ..runtime import cpu_isa

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    import os

    return f"{name}, {len(os.sched_getaffinity(0))} cores, {cpu_isa()}"


def _runtime_of(out: Path, directory: str) -> dict | None:
    """The precision a stage recorded: pretraining's runtime.json, the other stages' run.json "runtime"."""
    path = out / directory / "runtime.json"
    if path.exists():
        return json.loads(path.read_text())
    path = out / directory / "run.json"
    return json.loads(path.read_text()).get("runtime") if path.exists() else None


def precision_line(out: Path) -> str:
    """One line: each stage's compute precision and the reasons runtime.resolve recorded for the choices."""
    from ..runtime import DECODE_BF16_ROWS

    parts, reasons = [], []
    dirs = dict.fromkeys([("student-pretrain", "student-base")] + [(m.lineage[-1], m.dir) for m in MODELS])
    for stage, directory in dirs:
        rt = _runtime_of(out, directory)
        if rt:
            parts.append(f"{stage} {rt['precision']}")
            reasons.append(rt.get("reason"))
    evals = [e.get("runtime") for e in (json.loads(p.read_text()) for p in sorted(out.glob("eval/*/*.json")))]
    if any(evals):
        parts.append(f"evaluations {'/'.join(sorted({e['precision'] for e in evals if e}))}")
        reasons += [e.get("reason") for e in evals if e]
    why = "; ".join(dict.fromkeys(r for r in reasons if r))
    return ("Compute precision (`--precision auto`: bf16 on a GPU with bf16, and on a CPU with native bf16 (AMX, "
            f"AVX512-BF16) for training and for decoding {DECODE_BF16_ROWS} rows or more; fp32 otherwise): "
            + "; ".join(parts) + (f" ({why})." if why else ".")) if parts else ""


def write_results(out: Path, cfg, steps: dict, timings: dict) -> Path:
    """OUT/results.json, OUT/heldout.jsonl and OUT/ood.jsonl from the stages' and evaluations' own outputs."""
    stages = {m.key: r for m in MODELS if (r := _model_record(out, m, timings)) is not None}
    for split in ("heldout", "ood"):
        ev = next((e for m in MODELS if (e := _eval(out, split, m.key)) is not None), None)
        problems = [{"id": p["id"], "question": p["question"], "answer": p["answer"]} for p in (ev or {}).get(
            "problems", [])]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    sets = {}
    for split, rung in (("heldout", RUNGS["rl"]), ("ood", RUNGS["ood"])):
        ev = next((e for m in MODELS if (e := _eval(out, split, m.key)) is not None), {})
        sets[split] = {"task_args": rung["task_args"], "what": rung["what"], "n": ev.get("n", 0),
                       "k": ev.get("k", PLAN["eval_k"]), "temperature": 0.6, "top_p": 0.95}
    notes = [f"**Arm {r['label']} did not change its weights**: it is not a trained arm."
             for r in stages.values() if r.get("weights_moved") == 0]
    results = {"task": "chain_sum", "sets": sets, "pretrain_rungs": RUNGS["pretrain"], "seed": cfg.seed,
               "budget": cfg.budget, "host": _host(), "precision": precision_line(out),
               "student_tokens_rule": STUDENT_TOKENS_RULE, "student_budget_flops": steps["student_flops"],
               "wall_s_total": round(sum(timings.values()), 1), "timings": timings, "stages": stages,
               "comparisons": _comparisons(out), "curves": _curves(), "notes": notes}
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
