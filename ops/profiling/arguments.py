"""The flags of `splitserve profile`, apart from the measurement so that building the CLI parser stays light.

The default sweeps follow the published perf_model.csv (prompt 128..8192 at batch 1, batch sizes at prompt 512,
token sizes at prompt 512 and batch 1) but stop the batch sweep at 16 and the token sweep at 512: on a 2-core CPU the
demo model's batch-64 point alone (64 x 512 prompt tokens prefilled five times) takes longer than the rest together,
and the defaults are meant to profile the demo model in under a minute. Pass the longer lists for a fuller profile.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

DEFAULT_PROMPT_SIZES = "128,256,512,1024,2048,4096,8192"
DEFAULT_BATCH_SIZES = "1,2,4,8,16"
DEFAULT_TOKEN_SWEEP = "256,512"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="a local Hugging Face model directory")
    parser.add_argument("--output", type=Path, required=True, help="the perf-model CSV to write")
    parser.add_argument("--name", default=None, help="the CSV's model column (default: the directory's name)")
    parser.add_argument("--hardware", default="cpu", help="the CSV's hardware column (default: cpu)")
    sweep = parser.add_argument_group("sweeps (through the anchor: --anchor-prompt, batch 1, --token-size)")
    sweep.add_argument(
        "--prompt-sizes",
        type=_sizes(minimum=1),
        default=DEFAULT_PROMPT_SIZES,
        help=f"prompt sweep at batch 1 (default {DEFAULT_PROMPT_SIZES}; those over the context are skipped)",
    )
    sweep.add_argument(
        "--batch-sizes",
        type=_sizes(minimum=1),
        default=DEFAULT_BATCH_SIZES,
        help=f"batch sweep at the anchor prompt (default {DEFAULT_BATCH_SIZES}; the published data goes to 64)",
    )
    sweep.add_argument(
        "--token-sweep",
        type=_sizes(minimum=2, allow_empty=True),
        default=DEFAULT_TOKEN_SWEEP,
        help=f"token sizes at the anchor prompt and batch 1 (default {DEFAULT_TOKEN_SWEEP}; '' for none)",
    )
    sweep.add_argument(
        "--token-size",
        type=_at_least(2),
        default=128,
        help="tokens generated per request in the prompt and batch sweeps (default 128)",
    )
    sweep.add_argument("--anchor-prompt", type=_at_least(1), default=512, help="default 512")
    sweep.add_argument("--repeats", type=_at_least(1), default=5, help="trials per point, one row each")
    engine = parser.add_argument_group("engine (as a node would run it)")
    engine.add_argument(
        "--threads", type=_at_least(1), default=None, help="torch threads (default: all cores)"
    )
    engine.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (float16 on CUDA only)")
    engine.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    engine.add_argument("--kv-cache-mb", type=_at_least(1), default=256, help="KV pool size (default 256)")


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _sizes(*, minimum: int, allow_empty: bool = False) -> Callable[[str], tuple[int, ...]]:
    """A comma-separated list of integers >= minimum, duplicates dropped, order kept."""
    one = _at_least(minimum)

    def parse(text: str) -> tuple[int, ...]:
        items = [item.strip() for item in text.split(",")] if text.strip() else []
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError("expected comma-separated integers, got nothing")
        return tuple(dict.fromkeys(one(item) for item in items))

    return parse
