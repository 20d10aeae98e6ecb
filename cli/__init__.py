"""The `genroute` command line."""
