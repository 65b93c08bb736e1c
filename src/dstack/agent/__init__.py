"""The per-host agent: runs jobs as processes and serves their state and logs over HTTP.

Run it with ``DSTACK_AGENT_TOKEN=T python -m dstack.agent --host H --port P --home DIR``; start it from
another process with :func:`dstack.agent.launcher.start_agent`. The HTTP API is specified in
docs/contracts.md ("Agent HTTP API").
"""
