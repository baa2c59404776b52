"""KV transfer: block layouts, the transport interface and its NIXL and torch.distributed backends (next issue)."""
