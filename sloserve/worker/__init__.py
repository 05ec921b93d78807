"""One rank of an engine: its model shard, KV cache and step execution (model_runner.py), the
CUDA graphs of its decode steps, and the processes of the other tensor-parallel ranks."""
