"""Code shared by the hotplug script, the CLI and the agent: parsers, readers of the kernel state, the registry."""
