"""Operational tools: the `splitserve` command line, and later telemetry, load tests, simulator and planner."""
