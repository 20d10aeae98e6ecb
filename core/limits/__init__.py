"""Limits kept in Redis and shared by every process: per-deployment slots, rate windows and
health (deployments), per-key rate and concurrency (keys), and the wait queues of jobs
that wait for a slot (waits)."""
