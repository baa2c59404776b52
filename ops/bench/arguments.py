"""The flags of `splitserve bench`, apart from its implementation so that building the CLI parser stays light."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", help="http(s)://HOST:PORT/v1 (OpenAI-compatible) or grpc://HOST:PORT")
    parser.add_argument(
        "--api", choices=["completions", "chat"], default="completions", help="for HTTP endpoints"
    )
    parser.add_argument(
        "--model", default=None, help="model name for HTTP (default: the first of /v1/models)"
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer.json or a model directory (builds the prompts)"
    )
    load = parser.add_argument_group("workload (one of --trace, --rate, --concurrency)")
    load.add_argument(
        "--trace", type=Path, help="Azure LLM inference trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)"
    )
    load.add_argument("--time-scale", type=float, default=1.0, help="replay the trace this many times faster")
    load.add_argument("--token-scale", type=float, default=1.0, help="multiply the trace's token counts")
    load.add_argument(
        "--max-context", type=int, default=None, help="clip prompt + output to the model's context"
    )
    load.add_argument("--start", type=int, default=0, help="first trace row")
    load.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight")
    load.add_argument("--num-requests", type=int, default=100)
    load.add_argument("--input-len", type=int, default=128)
    load.add_argument("--output-len", type=int, default=64)
    load.add_argument("--seed", type=int, default=0)
    chat = parser.add_argument_group("multi-turn conversations (ops/bench/conversations.py)")
    chat.add_argument(
        "--turns",
        type=int,
        default=1,
        help="group every N requests into a conversation: each turn resends the earlier turns and answers",
    )
    chat.add_argument(
        "--think-time", type=float, default=0.0, help="seconds between a turn's answer and the next"
    )
    chat.add_argument(
        "--system-prompt-len", type=int, default=0, help="tokens of a system prompt every conversation shares"
    )
    slo = parser.add_argument_group("service-level objectives")
    slo.add_argument("--slo-ttft", type=float, default=None, help="seconds; with --slo-tpot gives goodput")
    slo.add_argument("--slo-tpot", type=float, default=None, help="seconds per output token")
    slo.add_argument(
        "--baseline", type=Path, default=None, help="requests.csv of a baseline run: Splitwise 9-SLO check"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default bench-results/<time>)"
    )
    parser.add_argument("--plot", action="store_true", help="also write PNG plots (needs matplotlib)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON (default: a table); results.json has it too",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request deadline, seconds")
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar=("A.json", "B.json"), help="print two runs side by side"
    )
