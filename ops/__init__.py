"""What operators run: the `splitserve` command line, the local launcher, the load tester (bench), simulator (sim),
planner (plan), profiler and the Kubernetes operator. Servers never import this package (cluster/ is their floor)."""
