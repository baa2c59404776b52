"""`splitserve bench`: a load-test harness for any OpenAI-compatible endpoint and for splitserve's gRPC endpoint.

Modules, each usable on its own (none imports torch or the engine, so the harness runs on a laptop):
  workload   what to send and when: Azure LLM inference traces, Poisson arrivals, closed-loop concurrency
  prompts    synthetic prompts of an exact token length, built with the served model's tokenizer
  metrics    per-request timings -> TTFT / TBT / TPOT / E2E, throughput; the run's Summary
  stats      percentiles (numpy's linear method) and the Stats of one metric
  slo        DistServe-style goodput and the Splitwise 9-SLO check against a baseline run
  report     results JSON, per-request CSV, side-by-side comparison of two runs
  plots      latency CDFs and time series (data preparation always; rendering needs matplotlib)
  progress   a live progress line on stderr
"""
