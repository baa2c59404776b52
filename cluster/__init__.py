"""What every server process of a cluster shares: the floor under the router and both node types.

  state/          cluster state in Redis (registrations, load reports, control records, the router's view)
  node/           a node server's runtime: start-up and registration, drain/move control, metrics, the progress
                  watch, the whole-request service, recent request ids
  power/          power telemetry, per-request energy and cost accounting, GPU power caps
  auth            the cluster token every internal gRPC call and Redis connection carries
  tracing         OpenTelemetry set-up and trace-context propagation
  grpc_util       server construction and error mapping shared by every gRPC servicer
  proto_convert, sampling_proto   engine values to and from the wire
  failed_side     which side of a prefill->decode pair failed, reported to the router
  machines        machine types (cost, power, speed) and the catalog file that defines more
  perfmodel       the Splitwise performance model used by placement, power caps and the simulator
  slo             the Splitwise SLO limits (paper Table VI)
  redis_server    the embedded Redis server for local clusters and tests
  allocator       the process's memory-allocator settings

Layers (enforced by .importlinter): ops -> router | prefill_node | decode_node -> cluster -> kvtransfer -> engine ->
splitserve (generated protobuf). Nothing here imports the router, a node package or ops.
"""
