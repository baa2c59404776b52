"""A node's power and what its requests cost: telemetry, per-request attribution, and GPU power caps.

Modules (none imports torch or the engine, so they are tested on their own and usable by routers and tools):
  telemetry   PowerMeter: NVML where the node runs on a GPU ("measured"), else the machine type's power model driven
              by the engine's utilisation ("modeled")
  accounting  ChargeLedger: splits each engine step's energy and cost over the requests in it, and the KV transfer
              wait over the requests waiting then
  powercap    a per-GPU power cap: its effect on the machine type, a recommended cap from SLO slack, and applying it
              through NVML (dry-run by default)
"""
