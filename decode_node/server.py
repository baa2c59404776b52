"""Entry point of a decode or colocated node process: `splitserve decode` / `splitserve colocated`.

The request life cycles are in decode_node/service.py (decode) and cluster/node/whole_request.py (whole requests: every
colocated request, and on a decode node the requests the router prefills locally or lends it for).
"""

from __future__ import annotations

from typing import Any

import grpc

from cluster.event_loop import run
from cluster.grpc_util import add_checked_servicer
from cluster.node.runtime import NodeOptions, NodeService, run_node
from cluster.node.whole_request import WholeRequestService
from decode_node.service import DecodeNodeService
from engine.async_engine import AsyncEngine
from splitserve.v1 import cluster_pb2_grpc, inference_pb2_grpc

DECODE_SERVICE = "splitserve.v1.DecodeNode"
INFERENCE_SERVICE = "splitserve.v1.Inference"


def serve(options: NodeOptions) -> int:
    def attach(engine: AsyncEngine, transport: Any, server: grpc.aio.Server) -> NodeService:
        if options.role == "colocated":
            colocated = WholeRequestService(engine)
            add_checked_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, colocated, server)
            return colocated
        service = DecodeNodeService(engine, transport, engine.engine.config.block_size)
        add_checked_servicer(cluster_pb2_grpc.add_DecodeNodeServicer_to_server, service, server)
        whole = WholeRequestService(engine, accepting=lambda: service.accepting)
        add_checked_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, whole, server)
        return service

    names = [INFERENCE_SERVICE] if options.role == "colocated" else [DECODE_SERVICE, INFERENCE_SERVICE]
    return run(lambda: run_node(options, names, attach))
