"""torch.distributed KV transport: gloo point-to-point pairs, made one-sided by a receiver thread on the decode side.

Pairing (transport.py). Every node that registers a pool hosts a TCPStore server; its descriptor carries the store's
host:port. A writer's connect() joins the receiver's store as a client and pushes a request (a fresh pair key, its
node id and layout) onto the store queue "kv/accept". The receiver's accept thread pops it, checks the layout and
answers under "kv/pair/<key>/answer"; then both build a two-rank ProcessGroupGloo on PrefixStore("kv/pair/<key>/pg")
(writer rank 0, receiver rank 1). Nothing global is set up: pairs join and leave at any time. A pair carries writes
from the connecting node to the accepting one only.

Who may connect. The store listens on the node's advertised host alone (a socket bound there, handed to TCPStore),
never on every interface, and gloo binds that host too. With a cluster token, a connect request carries
HMAC-SHA256(token, pair key) and the receiver refuses requests without it (or replaying a pair key already used):
no pair, so no write, from a process outside the cluster. TCPStore itself has no authentication hook: whoever can
reach the store's port can still read and write its keys (and so disturb pairs being set up); keep that port
reachable from cluster members only (a NetworkPolicy on Kubernetes), or use the NIXL backend.

A write, in the pair's order (pairs.py):
1. write_blocks() validates the ids and queues the write. The pair's sender thread cuts the (src, dst) pairs into
   runs consecutive on both sides (layout.coalesce_block_pairs). Long runs (256 KiB on average) go as one gloo
   send each, straight out of the pool; otherwise the source blocks are gathered into one message.
2. It pushes a header (layer, destination ids, run lengths, notify payload) onto the store queue
   "kv/pair/<key>/headers" and moves on to the next write; a completion thread waits for the sends in order, at
   most until each write's deadline, and settles the handles.
3. The receiver's thread pops the header and posts the recvs: straight into the pool for runs, into a staging
   buffer otherwise. Its landing thread waits for them in order, scatters staged blocks into place, then queues
   the notification. Both sides thus keep several layers in flight.
Headers travel through the store rather than gloo because an idle gloo recv can neither be abandoned (abort() does
not wake it) nor time out without breaking the pair, while a blocking queue pop ends when close() pushes an empty
header.

Ending a pair. Each side keeps a gloo recv posted on a second tag. close() on either side sends one byte there; the
other side's watcher answers in kind: a writer marks the pair broken (later writes fail at once), a receiver retires
it and drops its gloo group, whose closing sockets fail any send still waiting on it. A crash closes the sockets at
once, which ends the other side's watcher too.

Failures: a gloo error or a missed deadline breaks the pair; its pending and later writes are FAILED until the
writer connects again. CUDA pools are staged through host memory (gloo moves CPU tensors). NCCL was not used: its
watchdog ends the process on a timed-out or failed operation, where this transport must report FAILED and go on,
and a pair needs two GPUs, which no test machine has; GPU nodes use the NIXL transport.
"""

from kvtransfer.backends.torch_backend.transport import TorchTransport

__all__ = ["TorchTransport"]
