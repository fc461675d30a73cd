"""The microswarm volunteer agent: dials out, joins, installs packages, runs jobs, heartbeats."""
