"""Replicate-compatible routes under /replicate: the official `replicate` client, pointed at
genroute (`replicate.Client(api_token=KEY, base_url="https://HOST/replicate")` or
REPLICATE_BASE_URL), runs any catalog model unchanged.

    routes.py   the endpoints (predictions, models, versions, webhook secret, stream)
    inputs.py   Replicate-style model input -> our normalized job input
    errors.py   Replicate's problem+json error shape for these routes
    core/predictions.py renders the prediction object (shared with webhook delivery)
"""

from api.replicate.routes import router

__all__ = ["router"]
