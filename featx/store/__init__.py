"""The ``featx.embeddings/1`` HDF5 file (write, resume, verify, read, publish shards), cache keys and
layout, and the memo of slow, checkable facts. The bottom of the flow: imports only featx's root."""
