"""Records in, token ids and labels out: loading, tokenization and masking, batches, streamed units. May import
workers.storage.
"""
