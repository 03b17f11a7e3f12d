"""Pure loss functions shared by pretraining, SFT, distillation and GRPO.

`linear_cross_entropy` is the fast path for the output head: it never materialises the (N, vocab) logits.
Rows are processed in cache-sized chunks, and because the loss is a scalar its gradients with respect to
the hidden states and the head weight are computed in the same pass (the backward only rescales them).
`cross_entropy_reference` is the plain version it is tested against. In bf16 the logits come out of a bf16
GEMM and everything after it (log-sum-exp, softmax gradient, the head's gradient sum over chunks) is fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mean over non-ignored rows of -log softmax(h Wᵀ)[target], via full logits (the reference)."""
    logits = (h @ weight.T).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def _chunk_rows(vocab: int) -> int:
    # ~1M logits per chunk (4 MB fp32): the softmax stays in cache and the chunk matmuls stay efficient
    return max(64, min(4096, (1 << 20) // max(vocab, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index):
        valid_all = targets != ignore_index
        n_valid = valid_all.sum().clamp(min=1)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = _chunk_rows(weight.shape[0])
        for s in range(0, h.shape[0], step):
            hc, valid = h[s:s + step], valid_all[s:s + step]
            tgt = torch.where(valid, targets[s:s + step], 0).unsqueeze(1)
            logits = hc @ weight.T  # (n, V) in h's dtype
            # one fused pass gives the fp32 softmax; -log p[target] is the loss, except where p underflows
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            p_target = probs.gather(1, tgt).squeeze(1)
            nll = -p_target.log()
            tiny = valid & (p_target < 1e-30)
            if tiny.any():  # log-sum-exp form for the rows whose target probability underflowed
                rows = logits[tiny].float()
                nll[tiny] = torch.logsumexp(rows, dim=-1) - rows.gather(1, tgt[tiny]).squeeze(1)
            total += torch.where(valid, nll, 0.0).sum()
            if want_grad:
                # dL/dlogits = (softmax - onehot) · valid / n_valid; the per-row scale is applied to the small
                # (n, D) factors of both gradient GEMMs rather than to the (n, V) probabilities
                probs.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=probs.dtype))
                g = probs.to(h.dtype)
                scale = (valid / n_valid).unsqueeze(1)
                torch.mul(g @ weight, scale, out=grad_h[s:s + step])
                hs = (hc * scale).to(h.dtype)
                if hc.dtype == torch.float32:
                    grad_w.addmm_(g.T, hs)
                else:  # a bf16 GEMM (fp32 accumulation inside, one rounding) per chunk, summed in fp32
                    grad_w += g.T @ hs
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of logits h·Wᵀ against targets, rows with targets == ignore_index skipped.

    h: (N, D) hidden states, weight: (V, D) output head, targets: (N,) int64. Equal to
    `cross_entropy_reference` (fp32 softmax) up to summation order; differentiable in h and weight.
    """
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index)


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor, router_log=None, **packing) -> tuple[torch.Tensor, list]:
    """(mean next-token cross-entropy, [mean cross-entropy of MTP depth k for k = 1..D]) of a Transformer.

    inputs, targets (B, T): the tokens and the next tokens (IGNORE_INDEX skips a position); MTP depth k
    predicts targets[:, k:]. The head and the loss are fused (`linear_cross_entropy`): no logits tensor.
    packing: `positions`/`segments` of packed documents (document_segments), passed to the model."""

    def head(h, weight, k):
        return linear_cross_entropy(h.flatten(0, 1), weight, targets[:, k:].flatten())

    return model(inputs, return_mtp=True, router_log=router_log, head=head, **packing)


def document_segments(tokens: torch.Tensor, eos_id: int) -> dict:
    """{"segments", "positions"} (B, T) of a packed row whose documents each end with eos: the token after an eos
    starts a new segment, and positions count from 0 within each segment (what the model sees at inference)."""
    B, T = tokens.shape
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    index = torch.arange(T, device=tokens.device).expand(B, T)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # start of each one's segment
    return {"segments": starts.long().cumsum(dim=1) - 1, "positions": index - first}


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_seq: int, per_sequence: bool = True) -> torch.Tensor:
    """Σ_i f_i·P_i of one MoE layer (V3 report eqs. 17-20), averaged over sequences (or over the whole batch).

    scores (N, E): the router's unbiased scores, normalised here over all experts (s' = s / Σ s); indices
    (N, K): the chosen experts. f_i = E/(K·T) · #tokens choosing i, P_i = mean s'_i, over each sequence of T
    tokens (per_sequence, V3's complementary loss) or over all N tokens (the classic batch-level auxiliary loss).
    Perfect balance gives 1. Multiply by α.
    """
    N, E = scores.shape
    K = indices.shape[1]
    groups = n_seq if per_sequence else 1
    T = N // groups
    s = scores / scores.sum(dim=-1, keepdim=True)
    P = s.view(groups, T, E).mean(dim=1)  # (G, E)
    counts = torch.zeros(groups, E, device=scores.device).scatter_add_(
        1, indices.reshape(groups, T * K), torch.ones(groups, T * K, device=scores.device))
    f = counts * (E / (K * T))
    return (f * P).sum(dim=-1).mean()


# ----------------------------------------------------------------------------- RL (GRPO and variants)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(tokens) and the entropy of each position's distribution, both (B, T), from logits (B, T, V), fp32.

    The distribution is softmax(logits / temperature): the policy that sampled at that temperature."""
    logp_all = (logits.float() / temperature).log_softmax(dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def group_advantages(rewards: torch.Tensor, scale: str | bool = "group", eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std + eps) over each row of rewards (groups, G).

    scale "group": the group's std (GRPO, DeepSeekMath §4.1); "batch": the std of every reward in the batch
    (TRL's scale_rewards="batch"; a group that differs only by a small reward component then gets a small
    advantage instead of a full-size one); "none": r - mean(r) (Dr. GRPO, arXiv 2503.20783). std is
    Bessel-corrected, as in TRL and veRL. True/False mean "group"/"none".
    """
    scale = {True: "group", False: "none"}.get(scale, scale)
    adv = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale == "group" and rewards.shape[-1] > 1:
        adv = adv / (rewards.std(dim=-1, keepdim=True) + eps)
    elif scale == "batch" and rewards.numel() > 1:
        adv = adv / (rewards.std() + eps)
    elif scale not in ("group", "batch", "none"):
        raise ValueError(f"reward scaling must be group, batch or none, got {scale!r}")
    return adv


def process_advantages(step_rewards: list[list[float]], token_steps: list[list[int]], group_size: int,
                       to_go: bool = True, eps: float = 1e-4) -> list[torch.Tensor]:
    """Per-token advantages from per-step rewards (GRPO with process supervision, DeepSeekMath §4.1.3).

    step_rewards[i]: the rewards of sequence i's steps in order; token_steps[i]: the step each of its tokens
    belongs to; sequences come group by group (`group_size` each). Every step reward is normalised by the mean
    and std of all step rewards of its group; a token's advantage is the sum of the normalised rewards of its
    step and every later one (to_go, the paper's) or of its own step only. Returns one (T_i,) tensor a sequence.
    """
    out = []
    for g in range(0, len(step_rewards), group_size):
        group = step_rewards[g:g + group_size]
        flat = torch.tensor([r for rewards in group for r in rewards], dtype=torch.float32)
        mean, std = flat.mean(), (flat.std() if flat.numel() > 1 else torch.tensor(0.0))
        for rewards, steps in zip(group, token_steps[g:g + group_size]):
            norm = (torch.tensor(rewards, dtype=torch.float32) - mean) / (std + eps)
            credit = norm.flip(0).cumsum(0).flip(0) if to_go else norm
            out.append(credit[torch.tensor(steps, dtype=torch.long)])
    return out


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π || π_ref) estimator k3 = π_ref/π − log(π_ref/π) − 1 (≥ 0, 0 iff equal; R1/GRPO), for
    tokens sampled from π."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              eps_low: float = 0.2, eps_high: float | None = None, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None, norm: str = "token", max_len: int | None = None,
              is_weight: torch.Tensor | None = None):
    """The clipped-ratio policy loss with an optional k3 KL penalty; returns (loss, stats).

    logp/old_logp/ref_logp/mask: (B, T) over completion tokens; advantages: (B,), or (B, T) per token (process
    supervision, `process_advantages`). Aggregation: "sequence" =
    mean over each response then over responses (GRPO; length-biased), "token" = sum over all tokens / number
    of tokens (DAPO), "constant" = sum / (B · max_len) (Dr. GRPO). is_weight (B, T), when given, multiplies each
    token's policy term: truncated importance sampling min(π_old / π_rollout, C) for rollouts sampled by a
    numerically different engine (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"). stats: KL (0 without ref_logp), the clipped share (and its low/high sides), ratio range.
    """
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.float()
    ratio = (logp - old_logp).exp()
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if is_weight is not None:
        per_token = per_token * is_weight
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    if norm == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif norm == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif norm == "constant":
        if not max_len:
            raise ValueError("norm='constant' needs max_len")
        loss = (per_token * mask).sum() / (mask.shape[0] * max_len)
    else:
        raise ValueError(f"unknown loss normalisation {norm!r} (sequence, token or constant)")
    with torch.no_grad():
        low, high = (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)
        n = mask.sum().clamp(min=1)
        on = mask.bool()
        stats = {"clip_frac": (((low | high).float() * mask).sum() / n).item(),
                 "clip_low": ((low.float() * mask).sum() / n).item(),
                 "clip_high": ((high.float() * mask).sum() / n).item(),
                 "kl": ((kl * mask).sum() / n).item(),
                 "ratio_max": ratio[on].max().item() if on.any() else 1.0,
                 "ratio_min": ratio[on].min().item() if on.any() else 1.0}
    return loss, stats


# ----------------------------------------------------------------------------- on-policy distillation


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(π_student ‖ π_teacher) = Σ_v p_s(v)·(log p_s(v) − log p_t(v)) over the whole vocabulary,
    (N, V) logits → (N,), in fp32.

    On-policy distillation (Agarwal et al. 2024, arXiv 2306.13649, "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes"): the student samples, the teacher scores every position of the
    student's own text, and the student minimises the reverse KL to the teacher's full distribution there. Exact
    over the vocabulary (no sampling of the KL), so every token of every sample carries a dense signal, where
    RL has one scalar per sample. Reverse KL is mode-seeking: the student is not asked to cover the teacher's
    whole distribution, only to put its own mass where the teacher does."""
    logp_s = student_logits.float().log_softmax(-1)
    logp_t = teacher_logits.float().log_softmax(-1)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)
