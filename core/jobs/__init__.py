"""Jobs: the ledger (the one writer of a job's status), submission, the ARQ queues and
the Redis poll schedule of jobs running at a provider."""
