"""A backbone over a dataset, once: the registry, weights, the model at run time, planning (cache keys,
cache hits, torch-free), extraction here or as shards on a Dask cluster, and fine-tuned checkpoints."""
