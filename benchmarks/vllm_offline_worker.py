"""One timed run of vLLM's offline `LLM.generate` on a job that benchmarks/engine_vs_vllm.py wrote.

Runs under vLLM's own virtualenv (made by `make bench-vllm`), so it imports nothing of splitserve's:

    python benchmarks/vllm_offline_worker.py JOB.json RESULT.json

The job gives the model, dtype, prompt token ids and each request's output length; the result is the output tokens
vLLM actually returned and the wall time of the one `generate` call that runs them all. Engine start-up (weight load,
torch.compile warm-up, KV cache allocation) and a small warm-up request are outside the timed call, as for splitserve.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        seed=job["seed"],
        # On CPU the default reserves a fraction of all RAM for the KV cache and refuses to start when that much is
        # not free; a fixed size, ample for the workload, keeps the run independent of what else the machine holds.
        kv_cache_memory_bytes=job["kv_cache_bytes"],
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in job["max_tokens"]]
    warm = SamplingParams(max_tokens=2, temperature=0.0)
    llm.generate([TokensPrompt(prompt_token_ids=job["prompts"][0][:8])], warm, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    Path(sys.argv[2]).write_text(json.dumps({"output_tokens": tokens, "seconds": elapsed}))
    return 0


if __name__ == "__main__":  # vLLM starts its engine processes with spawn: they re-import this file
    raise SystemExit(main())
