"""Data: the embedded procedural image set, image decoding/preprocessing and token shards."""
