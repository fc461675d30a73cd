"""The `microswarm` command line: coordinator, agent, publish, call, status, demo, bench."""
