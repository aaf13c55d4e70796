"""The control plane: CLI, the Ray driver that runs a job's stages, job records and the artifact store."""
