"""ARQ workers: run_job, poll_job, cancel_job and the reconciler cron."""
