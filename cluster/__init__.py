"""Running pdserve on Ray: the worker pools and the router (cluster.cluster), their
configuration (cluster.config), the autoscaling planner (cluster.planner: pure Python, no Ray),
and the `pdserve` command (cluster.cli)."""
