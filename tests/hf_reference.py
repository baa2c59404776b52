"""Hugging Face transformers as the oracle for model outputs.

Comparison is teacher-forced: the reference runs once over prompt + our generated tokens and yields its logits at every
generated position. Each of our greedy tokens must be the reference's argmax there, unless the reference's own top-2
margin is below `margin_tol` (a near-tie that rounding may legitimately flip). Our reported logprob of each token must
equal the reference's log-softmax within `logprob_tol`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from engine.engine import Completion


@dataclass
class ParityReport:
    tokens_compared: int = 0
    near_ties_skipped: int = 0
    max_logprob_error: float = 0.0


def load_reference(model_dir: Path, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model


@torch.inference_mode()
def reference_logprobs(model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Log-softmax at each generated position: row i predicts output_ids[i]. Shape [len(output_ids), vocab]."""
    ids = torch.tensor([prompt_ids + output_ids])
    logits = model(ids).logits[0].float()
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits[start : start + len(output_ids)], dim=-1)


def assert_matches_reference(
    model, completions: list[Completion], margin_tol: float = 1e-3, logprob_tol: float = 1e-4
) -> ParityReport:
    report = ParityReport()
    for c in completions:
        ref = reference_logprobs(model, c.prompt_token_ids, c.token_ids)
        top2 = ref.topk(2, dim=-1)
        for i, token in enumerate(c.token_ids):
            best, second = top2.values[i].tolist()
            if token != int(top2.indices[i, 0]):
                if best - second >= margin_tol:
                    raise AssertionError(
                        f"{c.request_id}: token {i} is {token}, reference argmax {int(top2.indices[i, 0])} "
                        f"with margin {best - second:.2e} (>= {margin_tol})"
                    )
                report.near_ties_skipped += 1
            report.tokens_compared += 1
            if c.logprobs:
                err = abs(c.logprobs[i].logprob - float(ref[i, token]))
                report.max_logprob_error = max(report.max_logprob_error, err)
                if err > logprob_tol:
                    raise AssertionError(
                        f"{c.request_id}: logprob of token {i} is {c.logprobs[i].logprob:.6f}, "
                        f"reference {float(ref[i, token]):.6f}"
                    )
    return report
