"""The domain of genroute: settings, ledger, catalog, routing and the plain types that
adapters and storage speak. Imports nothing from api/, workers/, adapters/ or storage/."""
