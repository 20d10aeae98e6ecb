"""Provider adapters: pure translation between genroute's normalized request/result and a
provider's wire format. Each provider is one module; `registry` finds them by name."""
