"""The Ray Train + DeepSpeed training loop, its DeepSpeed config, ZeRO-3 partitioned loading, a sweep trial. May
import storage, runtime, data, methods, model.
"""
