"""The microswarm coordinator daemon: registry, packages, agents, dispatch, cache, client API."""
