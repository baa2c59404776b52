"""The flags of `splitserve plan`, apart from its implementation so that building the CLI parser stays light."""

from __future__ import annotations

import argparse
from pathlib import Path

from ops.sim.arguments import add_input_arguments, add_link_and_kv_arguments
from ops.sim.design import DESIGNS
from router.policies import add_policy_arguments

GOAL_NAMES = ("iso-power", "iso-cost", "min-power", "min-cost")
DEFAULT_BUDGET = "40xdgx-h100"  # the paper's iso budget, splitwise-facts.md line 66
# Requests in the trace sample. At the rates these clusters sustain, a sample must span minutes of arrivals for
# queues to build: shorter ones start empty and drain before load accumulates (docs/planning.md measures this).
DEFAULT_SAMPLE = 10000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    goal = parser.add_argument_group("goal")
    goal.add_argument(
        "--goal",
        choices=GOAL_NAMES,
        default="iso-power",
        help="iso-power/iso-cost: highest rate within a budget; min-power/min-cost: cheapest at --target-rps",
    )
    goal.add_argument(
        "--budget",
        default=DEFAULT_BUDGET,
        help="iso goals: W (iso-power) or $/h (iso-cost), or machines like 40xdgx-h100 or 25xdgx-h100+26xdgx-a100 "
        f"(default {DEFAULT_BUDGET}, the paper's)",
    )
    goal.add_argument("--target-rps", type=float, default=None, help="min goals: requests/s to sustain")
    goal.add_argument(
        "--power-basis",
        choices=("rated", "paper"),
        default="rated",
        help="machine power: the catalog's rating (default) or the Splitwise simulator's normalised power",
    )
    designs = parser.add_argument_group("designs")
    designs.add_argument(
        "--design",
        action="append",
        default=None,
        help=f"a built-in design, repeatable (default: all of {', '.join(DESIGNS)})",
    )
    designs.add_argument(
        "--custom",
        action="append",
        default=[],
        metavar="NAME=TYPES",
        help="a design of catalog types: NAME=PREFILL_TYPE:DECODE_TYPE or NAME=TYPE (colocated); repeatable",
    )
    designs.add_argument(
        "--machines",
        type=Path,
        default=None,
        help='machine catalog JSON {"machines": [...]} added to the built-ins',
    )
    add_policy_arguments(designs)
    sample = parser.add_argument_group("trace sample")
    sample.add_argument("--start", type=int, default=0, help="first trace row of the sample (0-based)")
    sample.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_SAMPLE,
        help=f"requests in the sample (default {DEFAULT_SAMPLE}; shorter samples overstate high rates)",
    )
    sample.add_argument(
        "--arrivals",
        choices=("trace", "poisson"),
        default="trace",
        help="arrival times: the trace's, compressed to each rate (default), or Poisson with the trace's lengths",
    )
    sample.add_argument("--seed", type=int, default=0, help="of the Poisson arrivals")
    search = parser.add_argument_group("search")
    search.add_argument(
        "--rate-tolerance", type=float, default=0.05, help="relative precision of each max rate"
    )
    search.add_argument("--max-probes", type=int, default=14, help="simulations per rate search at most")
    search.add_argument("--coarse-points", type=int, default=5, help="first-pass configurations per design")
    search.add_argument(
        "--max-machines", type=int, default=256, help="min goals: the largest cluster considered"
    )
    search.add_argument("--jobs", type=int, default=1, help="simulations run in parallel (one core each)")
    search.add_argument(
        "--time-limit", type=float, default=3600.0, help="stop the plan after this many seconds"
    )
    add_link_and_kv_arguments(parser.add_argument_group("machine model (as `splitserve simulate`)"))
    out = parser.add_argument_group("output")
    out.add_argument(
        "--paper-trace",
        choices=("auto", "conversation", "coding", "none"),
        default="auto",
        help="which of the paper's traces to compare with (auto: from the trace's file name)",
    )
    out.add_argument("--output", type=Path, default=None, help="write the plan as JSON here")
    out.add_argument("--plot", type=Path, default=None, help="save a PNG of the plan here")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    cluster = parser.add_argument_group("SplitserveCluster of the answer (docs/planning.md)")
    cluster.add_argument(
        "--cluster-out",
        type=Path,
        default=None,
        help="write a SplitserveCluster YAML of the chosen pool sizes here",
    )
    cluster.add_argument(
        "--cluster-design",
        default=None,
        help="the phase-split design whose answer it runs (default: the one that best serves the goal)",
    )
    cluster.add_argument(
        "--cluster-template",
        type=Path,
        default=None,
        help="a SplitserveCluster YAML to start from: only the prefill/decode replicas and machineType are set",
    )
    cluster.add_argument(
        "--cluster-name", default=None, help="its metadata.name (default: the template's, else the design's)"
    )
