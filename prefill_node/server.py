"""Entry point of a prefill node process: `splitserve prefill`. The request life cycle is in prefill_node/service.py.

A prefill node also serves the public Inference service (cluster/node/whole_request.py) for the requests the
router's mixed pool lends it for: those run to their end on this node (keep_local) instead of handing their KV over.
"""

from __future__ import annotations

from typing import Any

import grpc

from cluster.event_loop import run
from cluster.grpc_util import add_checked_servicer
from cluster.node.runtime import NodeOptions, run_node
from cluster.node.whole_request import WholeRequestService
from engine.async_engine import AsyncEngine
from prefill_node.service import PrefillNodeService
from splitserve.v1 import cluster_pb2_grpc, inference_pb2_grpc

SERVICE_NAME = "splitserve.v1.PrefillNode"
INFERENCE_SERVICE = "splitserve.v1.Inference"


def serve(options: NodeOptions) -> int:
    def attach(engine: AsyncEngine, transport: Any, server: grpc.aio.Server) -> PrefillNodeService:
        block_size = engine.engine.config.block_size
        service = PrefillNodeService(
            engine, transport, block_size, options.one_piece_below, options.cluster_token
        )
        add_checked_servicer(cluster_pb2_grpc.add_PrefillNodeServicer_to_server, service, server)
        whole = WholeRequestService(engine, keep_local=True, accepting=lambda: service.accepting)
        add_checked_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, whole, server)
        return service

    return run(lambda: run_node(options, [SERVICE_NAME, INFERENCE_SERVICE], attach))
