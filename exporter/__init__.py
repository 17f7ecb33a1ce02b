"""The agent: a Prometheus exporter and health checks (iscsimple-agent)."""
