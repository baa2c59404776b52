"""`splitserve bench`: load-test any OpenAI-compatible endpoint or splitserve's gRPC endpoint.

    splitserve bench --endpoint http://127.0.0.1:8000/v1 --tokenizer MODEL_DIR --trace conv.csv --time-scale 10
    splitserve bench --endpoint grpc://127.0.0.1:50051 --tokenizer MODEL_DIR --rate 4 --num-requests 200
    splitserve bench --compare colocated/results.json split/results.json

Writes results.json (summary + config) and requests.csv into --out, and plots with --plot; prints the summary as
a table (`--json`: as JSON). The API key is never written: not in results.json, not in an error text it recorded.

What the user can fix (a missing tokenizer, trace or results file, an endpoint that does not answer, a key the
server refuses) is found before the run starts and raised as a UserError: one line, exit code 2 (ops/cli.py).
A run whose requests all failed exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.bench import report
from ops.bench.conversations import run_conversations
from ops.bench.drivers import Driver, GrpcDriver, OpenAIDriver
from ops.bench.metrics import RequestTiming, json_safe, request_samples, summarize
from ops.bench.progress import Progress
from ops.bench.prompts import BuiltPrompt, PromptBuilder
from ops.bench.runner import run_workload
from ops.bench.samples import RequestSample
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
from ops.cli_errors import UserError, require_file, require_reachable


def main(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare(args.compare)
    _check_inputs(args)
    workload = _workload(args)
    baseline = _baseline(args.baseline)
    builder = _prompt_builder(args.tokenizer, args.seed)
    prompts = builder.build_many([r.prompt_tokens for r in workload.requests])
    # Conversations: one system prompt shared by all, built under an index no request uses.
    system = builder.build(args.system_prompt_len, len(prompts)) if args.system_prompt_len else None
    model = _model_name(args)  # after the checks above: it asks an HTTP endpoint for its model
    out = args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    timings, duration = asyncio.run(_run(args, workload, prompts, model, system, builder.encode))
    _hide(args.api_key, timings)
    slos = GoodputSlos(args.slo_ttft, args.slo_tpot) if args.slo_ttft or args.slo_tpot else None
    summary = summarize(timings, duration_s=duration, slos=slos, baseline=baseline)
    out.mkdir(parents=True, exist_ok=True)
    report.write_results(out / "results.json", summary, recorded_config(args))
    samples = request_samples(timings)
    report.write_request_csv(out / "requests.csv", samples)
    if args.plot:
        from ops.bench.plots import plot_run

        plot_run(samples, out, title=str(args.endpoint))
    if args.json:
        print(json.dumps(json_safe(summary.to_dict()), indent=2, allow_nan=False))
    else:
        print(report.summary_table(summary), end="")
    print(f"splitserve bench: results in {out}/results.json and {out}/requests.csv", file=sys.stderr)
    return 0 if summary.completed else 1


def _compare(paths: list[Path]) -> int:
    first, second = paths
    for flag_path in paths:
        require_file(flag_path, "--compare")
    try:
        table = report.compare(first, second, labels=(first.parent.name or "A", second.parent.name or "B"))
    except ValueError as exc:  # not a results file; the message names it
        raise UserError(f"--compare {exc}") from None
    print(table, end="")
    return 0


def _check_inputs(args: argparse.Namespace) -> None:
    """Everything the run needs that can be missing, before a prompt is built or a request sent."""
    if not args.endpoint or not args.tokenizer:
        raise UserError("--endpoint and --tokenizer are required (or --compare A B)")
    if not args.endpoint.startswith(("http://", "https://", "grpc://")):
        raise UserError(f"--endpoint {args.endpoint}: give http://, https:// or grpc://HOST:PORT")
    tokenizer: Path = args.tokenizer
    if tokenizer.is_dir():
        if not (tokenizer / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {tokenizer}: no tokenizer.json in this directory")
    else:
        require_file(tokenizer, "--tokenizer")
    if args.turns < 1:
        raise UserError(f"--turns {args.turns}: give 1 or more")
    if args.think_time < 0 or args.system_prompt_len < 0:
        raise UserError("--think-time and --system-prompt-len must be >= 0")
    require_file(args.trace, "--trace")
    require_file(args.baseline, "--baseline")
    require_reachable(args.endpoint, "--endpoint")


def _baseline(path: Path | None) -> list[RequestSample] | None:
    if path is None:
        return None
    try:
        return report.read_request_csv(path)
    except ValueError as exc:  # the message names the file and line
        raise UserError(f"--baseline {exc}") from None


def _prompt_builder(tokenizer: Path, seed: int) -> PromptBuilder:
    try:
        return PromptBuilder(tokenizer, seed=seed)
    except Exception as exc:
        raise UserError(f"--tokenizer {tokenizer}: cannot load it: {exc}") from None


def _hide(secret: str | None, timings: list[RequestTiming]) -> None:
    """A server may echo what it was sent in an error text: such texts go into the results, the key must not."""
    if not secret:
        return
    for timing in timings:
        if timing.error and secret in timing.error:
            timing.error = timing.error.replace(secret, "***")


def _workload(args: argparse.Namespace) -> Workload:
    try:
        return _make_workload(args)
    except ValueError as exc:  # a malformed trace (the message names file and line) or workload flags
        raise UserError(str(exc)) from None


def _make_workload(args: argparse.Namespace) -> Workload:
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


async def _run(
    args: argparse.Namespace,
    workload: Workload,
    prompts: list[BuiltPrompt],
    model: str | None,
    system: BuiltPrompt | None,
    encode: Callable[[str], list[int]],
) -> tuple[list[RequestTiming], float]:
    driver = _driver(args, model)  # in the event loop: its connections belong to it
    try:
        with Progress(len(prompts)) as progress:
            started = time.perf_counter()

            def done(timing: RequestTiming) -> None:
                progress.request_done(failed=timing.error is not None)

            if args.turns > 1 or system is not None:
                timings = await run_conversations(
                    workload,
                    prompts,
                    driver,
                    turns=args.turns,
                    think_s=args.think_time,
                    system=system,
                    max_context=args.max_context,
                    request_timeout_s=args.timeout,
                    on_done=done,
                    encode=encode,
                )
            else:
                timings = await run_workload(
                    workload, prompts, driver, request_timeout_s=args.timeout, on_done=done
                )
            return timings, time.perf_counter() - started
    finally:
        await driver.close()


def _model_name(args: argparse.Namespace) -> str | None:
    """The model an HTTP endpoint is asked for (None for gRPC: splitserve serves one)."""
    if args.endpoint.startswith("grpc://"):
        return None
    return str(args.model or _first_model(args.endpoint, args.api_key))


def _driver(args: argparse.Namespace, model: str | None) -> Driver:
    endpoint: str = args.endpoint
    if model is None:
        return GrpcDriver(endpoint.removeprefix("grpc://"), api_key=args.api_key)
    return OpenAIDriver(endpoint, model, chat=args.api == "chat", api_key=args.api_key)


SECRET_FLAGS = ("--api-key",)


def recorded_config(args: argparse.Namespace) -> dict[str, object]:
    """The run's settings for results.json, with no secret: the API key becomes whether one was set, and its value
    is cut out of the words of the command line too (results get shared; keys must not travel with them)."""
    config: dict[str, object] = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("func", "api_key")
    }
    secret = getattr(args, "api_key", None)
    config["api_key_set"] = bool(secret)
    argv = config.get("argv")
    if isinstance(argv, list):
        config["argv"] = _without_secrets([str(word) for word in argv])
    # Also wherever else it may hide (`--api-k KEY`: argparse takes abbreviations; a key inside the endpoint URL).
    return _scrubbed(config, secret) if secret else config


def _scrubbed(value: Any, secret: str) -> Any:
    if isinstance(value, str):
        return value.replace(secret, "***")
    if isinstance(value, dict):
        return {k: _scrubbed(v, secret) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v, secret) for v in value]
    return value


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
    """The first model GET /models lists; a UserError for an answer without one, naming the flag to fix."""
    url = base_url.rstrip("/") + "/models"
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(json.load(response)["data"][0]["id"])
    except urllib.error.HTTPError as exc:
        hint = "check --api-key" if exc.code in (401, 403) else "check --endpoint, or give --model"
        raise UserError(f"--endpoint: GET {url} answered {exc.code} {exc.reason} ({hint})") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"--endpoint: GET {url} failed: {reason}") from None
    except (ValueError, KeyError, IndexError, TypeError):  # not JSON, or no model listed
        raise UserError(f"--endpoint: GET {url} lists no model (give --model)") from None
