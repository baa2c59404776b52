"""One module per KV transport backend, imported only when create_transport() names it; they never import each other."""
