"""Workers: ARQ tasks by verb (run, store, cancel, reconcile, webhooks) and the poller."""
