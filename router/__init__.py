"""The public side of a cluster: the gRPC server, validation, and the router that sends each
request to a prefill and a decode worker (or one colocated worker) and streams tokens back."""
