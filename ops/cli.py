"""The `splitserve` command line: the parser of every subcommand, and `main`, which runs the one given.

The server commands' flags live in ops/cli_args.py and their bodies in ops/cli_commands.py; the tools' (bench,
profile, simulate, plan, operator) in their own packages. Each subcommand imports what it needs only when it runs,
so `--help` is instant.

Errors a user can fix (bad flags, a missing or bad file, a port in use, an unreachable endpoint, bad sampling values)
print one line, `splitserve COMMAND: error: ...`, and exit with code 2 (ops/cli_errors.py), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ops.cli_args import EXIT_USAGE, add_node_args, add_router_args, add_up_args, positive_int
from ops.cli_commands import node_command, router_command, up_command
from ops.cli_errors import OneLineErrorParser, UserError, one_line, require_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    # The words as given: a node moving to another pool re-executes itself with them.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    from engine.errors import EngineError

    try:
        return int(args.func(args))
    except UserError as exc:
        return _fail(args.command, str(exc), exc.exit_code)
    except EngineError as exc:
        return _fail(args.command, one_line(exc), EXIT_USAGE)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # A file a flag named and no check caught first: still the user's to fix, and still one line.
        if exc.filename is None:
            raise
        return _fail(args.command, f"{exc.filename}: {exc.strerror}", EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


def _fail(command: str, message: str, exit_code: int) -> int:
    print(f"splitserve {command}: error: {message}", file=sys.stderr, flush=True)
    return exit_code


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="splitserve", description="Phase-split LLM serving (prefill/decode).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tiny = sub.add_parser(
        "make-tiny-model", help="write a random-weight Hugging Face checkpoint with a tokenizer"
    )
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--arch", choices=["llama", "qwen2", "qwen3", "mistral"], default="llama")
    tiny.add_argument("--layers", type=positive_int, default=2)
    tiny.add_argument("--hidden", type=positive_int, default=64)
    tiny.add_argument("--heads", type=positive_int, default=4)
    tiny.add_argument("--kv-heads", type=positive_int, default=2)
    tiny.add_argument("--vocab", type=positive_int, default=1024)
    tiny.add_argument("--intermediate", type=positive_int, default=None)
    tiny.add_argument("--max-position-embeddings", type=positive_int, default=2048)
    tiny.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_make_tiny_model)

    gen = sub.add_parser(
        "generate", help="generate text from a prompt on one local engine, streamed to stdout"
    )
    gen.add_argument("--model", type=Path, required=True, help="a local Hugging Face model directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (float16 on CUDA only)")
    gen.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    gen.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)"
    )
    gen.add_argument(
        "--tensor-parallel", type=positive_int, default=1, metavar="N",
        help="split the model over N processes (this one and N-1 it starts; each with --threads threads)",
    )  # fmt: skip
    gen.set_defaults(func=_cmd_generate)

    for role, text in (
        ("prefill", "run a prefill node (prompt phase; streams KV to decode nodes)"),
        ("decode", "run a decode node (token phase; receives KV from prefill nodes)"),
        ("colocated", "run a colocated node (both phases; the baseline and the router's fallback)"),
    ):
        node = sub.add_parser(role, help=text)
        add_node_args(node)
        node.set_defaults(func=node_command, role=role)

    router = sub.add_parser("router", help="run a router (public gRPC API; places requests on nodes)")
    add_router_args(router)
    router.set_defaults(func=router_command)

    up = sub.add_parser("up", help="start a whole local cluster (Redis, nodes, router) as separate processes")
    add_up_args(up)
    up.set_defaults(func=up_command)

    from ops.bench.arguments import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible or splitserve gRPC endpoint")
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    from ops.profiling.arguments import add_arguments as add_profile_arguments

    profile = sub.add_parser(
        "profile", help="measure this machine's prompt and token latency into a perf-model CSV"
    )
    add_profile_arguments(profile)
    profile.set_defaults(func=_cmd_profile)

    from ops.sim.arguments import add_arguments as add_simulate_arguments

    simulate = sub.add_parser(
        "simulate", help="replay a trace on a simulated cluster: latency, SLOs, throughput, cost, energy"
    )
    add_simulate_arguments(simulate)
    simulate.set_defaults(func=_cmd_simulate)

    from ops.plan.arguments import add_arguments as add_plan_arguments

    plan = sub.add_parser(
        "plan", help="size prefill/decode pools per design for max throughput at a budget or min cost/power"
    )
    add_plan_arguments(plan)
    plan.set_defaults(func=_cmd_plan)

    from ops.operator.command import add_arguments as add_operator_arguments

    operator = sub.add_parser(
        "operator", help="run the Kubernetes operator for SplitserveCluster resources, or print the CRD"
    )
    add_operator_arguments(operator)
    operator.set_defaults(func=_cmd_operator)
    return parser


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from engine.errors import InvalidRequestError
    from engine.tiny_model import make_tiny_model

    if args.hidden % args.heads:
        raise InvalidRequestError(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.heads % args.kv_heads:
        raise InvalidRequestError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    try:
        out = make_tiny_model(
            args.dir,
            arch=args.arch,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.kv_heads,
            vocab=args.vocab,
            seed=args.seed,
            intermediate=args.intermediate,
            max_position_embeddings=args.max_position_embeddings,
            dtype=args.dtype,
        )
    except ValueError as exc:  # e.g. a --vocab too small for byte-level BPE, or more than the corpus can fill
        raise InvalidRequestError(str(exc)) from exc
    print(out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    require_dir(args.model, "--model", "model directory")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    config = EngineConfig(dtype=args.dtype, device=args.device, tensor_parallel=args.tensor_parallel)
    engine = LLMEngine(args.model, config)
    try:
        prompt: str | list[int] = args.prompt
        if args.chat:
            # The rendered template already holds any BOS token; encoding must not add a second one.
            rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
            prompt = engine.tokenizer.encode(rendered, add_special_tokens=False)
        engine.add_request("cli", prompt, params)
        while engine.has_unfinished():
            for out in engine.step():
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        engine.close()  # the other tensor-parallel ranks
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ops.bench.command import main as bench_main

    return bench_main(args)


def _cmd_profile(args: argparse.Namespace) -> int:
    from ops.profiling.command import main as profile_main

    return profile_main(args)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ops.sim.command import main as simulate_main

    return simulate_main(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from ops.plan.command import main as plan_main

    return plan_main(args)


def _cmd_operator(args: argparse.Namespace) -> int:
    from ops.operator.command import main as operator_main

    return operator_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
