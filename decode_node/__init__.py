"""Decode node: the engine in its decode role, reserving blocks and generating tokens (next issue)."""
