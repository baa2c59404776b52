"""`splitserve bench`: load-test any OpenAI-compatible endpoint or splitserve's gRPC endpoint.

    splitserve bench --endpoint http://127.0.0.1:8000/v1 --tokenizer MODEL_DIR --trace conv.csv --time-scale 10
    splitserve bench --endpoint grpc://127.0.0.1:50051 --tokenizer MODEL_DIR --rate 4 --num-requests 200
    splitserve bench --compare colocated/results.json split/results.json

Writes results.json (summary + config) and requests.csv into --out, and plots with --plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path

from ops.bench import report
from ops.bench.drivers import Driver, GrpcDriver, OpenAIDriver
from ops.bench.metrics import request_samples, summarize
from ops.bench.progress import Progress
from ops.bench.prompts import PromptBuilder
from ops.bench.runner import run_workload
from ops.bench.slo import GoodputSlos
from ops.bench.workload import (
    Workload,
    fixed_concurrency,
    load_azure_trace,
    make_workload,
    poisson_arrivals,
    synthetic_lengths,
    trace_workload,
)


def main(args: argparse.Namespace) -> int:
    if args.compare:
        print(
            report.compare(
                *args.compare, labels=(args.compare[0].parent.name or "A", args.compare[1].parent.name or "B")
            )
        )
        return 0
    if not args.endpoint or not args.tokenizer:
        raise SystemExit(
            "splitserve bench: error: --endpoint and --tokenizer are required (or --compare A B)"
        )
    workload = _workload(args)
    builder = PromptBuilder(args.tokenizer, seed=args.seed)
    prompts = builder.build_many([r.prompt_tokens for r in workload.requests])
    out = args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    timings, duration = asyncio.run(_run(args, workload, prompts))
    slos = GoodputSlos(args.slo_ttft, args.slo_tpot) if args.slo_ttft or args.slo_tpot else None
    baseline = report.read_request_csv(args.baseline) if args.baseline else None
    summary = summarize(timings, duration_s=duration, slos=slos, baseline=baseline)
    out.mkdir(parents=True, exist_ok=True)
    report.write_results(out / "results.json", summary, recorded_config(args))
    samples = request_samples(timings)
    report.write_request_csv(out / "requests.csv", samples)
    if args.plot:
        from ops.bench.plots import plot_run

        plot_run(samples, out, title=str(args.endpoint))
    print(json.dumps(summary.to_json(), indent=2))
    print(f"splitserve bench: results in {out}/results.json and {out}/requests.csv", file=sys.stderr)
    return 0 if summary.completed else 1


def _workload(args: argparse.Namespace) -> Workload:
    if args.trace:
        requests = load_azure_trace(
            args.trace,
            time_scale=args.time_scale,
            token_scale=args.token_scale,
            max_context=args.max_context,
            limit=args.num_requests,
            start=args.start,
        )
        return trace_workload(requests, max_concurrency=args.concurrency)
    prompt_lens, output_lens = synthetic_lengths(
        args.num_requests, prompt_tokens=args.input_len, output_tokens=args.output_len, seed=args.seed
    )
    if args.rate:
        arrivals = poisson_arrivals(args.rate, args.num_requests, args.seed)
        return make_workload(prompt_lens, output_lens, arrivals=arrivals, concurrency=args.concurrency)
    return fixed_concurrency(prompt_lens, output_lens, args.concurrency or 1)


async def _run(args: argparse.Namespace, workload: Workload, prompts) -> tuple[list, float]:
    driver = _driver(args)
    try:
        with Progress(len(prompts)) as progress:
            started = time.perf_counter()
            timings = await run_workload(
                workload,
                prompts,
                driver,
                request_timeout_s=args.timeout,
                on_done=lambda t: progress.request_done(failed=t.error is not None),
            )
            return timings, time.perf_counter() - started
    finally:
        await driver.close()


def _driver(args: argparse.Namespace) -> Driver:
    endpoint: str = args.endpoint
    if endpoint.startswith("grpc://"):
        return GrpcDriver(endpoint.removeprefix("grpc://"), api_key=args.api_key)
    if not endpoint.startswith(("http://", "https://")):
        raise SystemExit(
            f"splitserve bench: error: --endpoint must start with http://, https:// or grpc://: {endpoint}"
        )
    model = args.model or _first_model(endpoint, args.api_key)
    return OpenAIDriver(endpoint, model, chat=args.api == "chat", api_key=args.api_key)


SECRET_FLAGS = ("--api-key",)


def recorded_config(args: argparse.Namespace) -> dict[str, object]:
    """The run's settings for results.json, with no secret: the API key becomes whether one was set, and its value
    is cut out of the words of the command line too (results get shared; keys must not travel with them)."""
    config: dict[str, object] = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("func", "api_key")
    }
    config["api_key_set"] = bool(getattr(args, "api_key", None))
    argv = config.get("argv")
    if isinstance(argv, list):
        config["argv"] = _without_secrets([str(word) for word in argv])
    return config


def _without_secrets(words: list[str]) -> list[str]:
    kept: list[str] = []
    hide_next = False
    for word in words:
        if hide_next:
            kept.append("***")
            hide_next = False
        elif word in SECRET_FLAGS:
            kept.append(word)
            hide_next = True
        elif word.startswith(tuple(f"{flag}=" for flag in SECRET_FLAGS)):
            kept.append(word.split("=", 1)[0] + "=***")
        else:
            kept.append(word)
    return kept


def _first_model(base_url: str, api_key: str | None) -> str:
    request = urllib.request.Request(base_url.rstrip("/") + "/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.load(response)["data"][0]["id"])
