"""Routing: the catalog (models, deployments, prices, limits), the router's pure decisions,
and the one dispatch path (route, acquire, call, fall back, release) that worker jobs and
inline chat share."""
