"""The shared foundation: the object store (file:// or S3), the node cache, the job's inputs in buckets, safetensors
files read by tensor. Used by both planes (the orchestrator's every layer may import it); imports jobspecs only.
"""
