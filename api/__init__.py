"""The HTTP API: FastAPI app, routes, auth, errors, signed file serving."""
