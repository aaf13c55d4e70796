"""The data plane: code that runs inside Ray tasks and actors. Imports jobspecs, never the orchestrator."""
