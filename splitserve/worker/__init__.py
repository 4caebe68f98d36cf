"""The runtime both worker roles share (`runtime`): engine loop thread, KV backend, cluster
presence, gRPC server and metrics. The roles themselves are `splitserve.prefill_worker` and
`splitserve.decode_worker`."""
