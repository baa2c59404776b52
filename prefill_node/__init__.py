"""Prefill node: the engine in its prefill role, streaming KV layer by layer to a decode node (next issue)."""
