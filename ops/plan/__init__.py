"""`splitserve plan`: Splitwise's provisioning search (ISCA 2024, "Provisioning") over the cluster simulator.

For each design (phase-split pools of given machine types, or a colocated baseline) it finds the pool sizes that
maximise the request rate sustained within all 9 Splitwise SLOs at a power or cost budget (iso-power, iso-cost),
or that minimise power or cost at a target rate (min-power, min-cost), and sets the answers beside the paper's.

Modules, in the order a plan uses them:
  pricing      what a machine counts against a budget (rated or paper power basis, $/h)
  designs      design specs (built-in and custom) and sized configurations
  budget       budgets and the configurations on a budget's frontier
  sample       the trace sample, replayed at any rate
  estimate     a rough capacity guess that starts each rate search
  rate_search  the highest passing rate of a configuration (bracket + bisection)
  search       coarse-to-fine scan over pool sizes
  outcome      the goals and the result types (trial, configuration, design)
  evaluate     simulations of one configuration (runs in worker processes)
  runner       in-process or multi-process execution under a deadline
  goals        the four goals for one design
  planner      all designs, then the paper's direction checks (checks)
  paper        the paper's figures and ours beside them
  report, plot the table, the JSON and the PNG; command and arguments: the CLI
  cluster_spec the SplitserveCluster that runs an answer (--cluster-out)
"""
