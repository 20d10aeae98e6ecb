"""Money and who owns it: tenants and their budgets, prices, the billing ledger (holds,
settles, releases) and usage records."""
