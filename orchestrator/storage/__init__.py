"""The job's store (file:// or S3) and its artifacts: checksummed upload, manifest last, verified fetch."""
