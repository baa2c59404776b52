"""splitserve's model engine, shared by prefill, decode and colocated nodes.

It loads Hugging Face checkpoints from local directories, keeps KV in a paged block pool with prefix caching, and runs
continuous batching with chunked prefill. It imports no networking, cluster-state or telemetry library: the nodes wrap it.
"""
