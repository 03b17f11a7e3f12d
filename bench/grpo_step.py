"""Time per GRPO step (rollouts + update): nanoseek vs TRL's GRPOTrainer, same model, prompts and lengths, one run.

The model is a checkpoint (default: a freshly initialised `tiny`-sized model with a tokenizer trained on the
task's prompts) exported with save_hf for TRL. Both sides: P prompts × G samples at temperature 1, at most
L new tokens, the same reward function (our task scorer), β = 0, one update per rollout batch, CPU, fp32.
Needs `pip install trl` (the `bench` extra).

    python bench/grpo_step.py [--steps 4] [--prompts 8] [--group 8] [--max-new 32] [--out docs/results/grpo_step.md]

Last line: step_s=… trl_step_s=… ratio=…
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import publish  # noqa: E402
from nanoseek import Transformer, get_preset  # noqa: E402
from nanoseek.checkpoint import save_model  # noqa: E402
from nanoseek.hf import save_hf  # noqa: E402
from nanoseek.stages.grpo import GRPOConfig, resolve_algo, rollout, update  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402
from nanoseek.tasks.base import combine  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

TASK_ARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def make_model(root: Path, task):
    problems = task.stream(0).take(400)  # repeats allowed: this setting has only 175 training questions
    texts = [task.prompt(p) + f" {p.answer} </think> <answer> {p.answer} </answer>" for p in problems]
    tok = Tokenizer.train(texts, 512)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256, dim=128, inter_dim=256,
                                   moe_inter_dim=64, n_mtp_layers=0))
    save_model(model, root / "ours", tokenizer_file=root / "tokenizer.json")
    save_hf(model, root / "hf")
    return model, tok


def time_ours(model, tok, task, args) -> list[float]:
    from nanoseek.engine import Engine

    cfg = GRPOConfig(init="-", task="chain_sum", out="-", prompts_per_step=args.prompts, group_size=args.group,
                     max_new_tokens=args.max_new, algo="dapo", dynamic_sampling="off", micro_batch=64, lr=1e-5)
    settings = resolve_algo(cfg)
    engine = Engine(model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        batch = rollout(engine, task, task.problems(step, args.prompts), cfg, step)
        update(model, None, opt, batch, cfg, settings)
        times.append(time.perf_counter() - t0)
    return times[1:]


def time_trl(root: Path, task, args) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), eos_token="<|eos|>",
                                  pad_token="<|pad|>", bos_token="<|bos|>")
    model = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    problems = task.problems(0, args.prompts * (args.steps + 1))
    data = Dataset.from_list([{"prompt": task.prompt(p), "gold": p.answer, "question": p.question} for p in problems])
    by_question = {p.question: p for p in problems}

    def reward(completions, question, **kwargs):
        return [combine(task.score(by_question[q], c)) for c, q in zip(completions, question)]

    times, marks = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["t"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - marks["t"])

    cfg = TRLConfig(output_dir=str(root / "trl"), use_cpu=True, bf16=False, per_device_train_batch_size=args.prompts *
                    args.group, num_generations=args.group, max_completion_length=args.max_new, max_steps=args.steps + 1,
                    learning_rate=1e-5, beta=0.0, temperature=1.0, logging_steps=1000, report_to="none",
                    save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="measured steps per side (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("chain_sum", **TASK_ARGS)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model, tok = make_model(root, task)
        ours = statistics.median(time_ours(model, tok, task, args))
        trl = statistics.median(time_trl(root, task, args))
    lines = [f"{args.prompts} prompts × {args.group} samples, ≤ {args.max_new} new tokens, temperature 1, β = 0, one "
             f"update per batch, fp32, {args.threads} threads; model: tiny preset at dim 128 (MoE, MLA), "
             "task chain_sum (2 one-digit terms)", "",
             "| | median seconds per GRPO step |", "|---|---|", f"| nanoseek | {ours:.2f} |", f"| TRL GRPOTrainer | {trl:.2f} |"]
    headline = f"step_s={ours:.2f} trl_step_s={trl:.2f} ratio={trl / ours:.2f}"
    publish("bench/grpo_step.py", lines, headline, args.out)


if __name__ == "__main__":
    main()
