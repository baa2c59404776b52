"""Router: the public endpoints and the placement of each request on a (prefill, decode) pair (next issue)."""
