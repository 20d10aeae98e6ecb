"""genroute's Python SDK namespace: `from genroute.client import Client, AsyncClient`.

The service itself lives in the top-level packages (api, workers, core, ...); this package
holds what a user's program imports to talk to it.
"""
