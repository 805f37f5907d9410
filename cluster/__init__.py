"""Running pdserve on Ray: the worker pools and the router (cluster.cluster), their
configuration (cluster.config), and the `pdserve` command (cluster.cli)."""
