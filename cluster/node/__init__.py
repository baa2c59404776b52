"""A node server's runtime, shared by prefill and decode nodes: see runtime.py for the life of a node process."""
