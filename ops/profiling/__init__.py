"""`splitserve profile`: measure a node's prompt and token latency on the local hardware into a perf-model CSV.

The CSV has the layout of the Splitwise simulator's perf_model.csv (see cluster.perfmodel), so the simulator, the
planner and node registration read a measured profile of this machine exactly as they read the published one.

Modules: arguments (the CLI flags; torch-free, imported when the parser is built), sweep (which points to measure),
results (rows and the CSV), measure (drives an engine step by step; imports torch), command (the subcommand).
The measurement runs the engine, so nothing on the router or simulator side may import this package's measure or
command modules.
"""
