"""The stages a driver runs (CorDA, train, export + report, upload) and their typed hand-over (Context)."""
