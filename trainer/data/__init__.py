"""Data: the resumable WebDataset stream (stream), remote shard reads (remote), shard writers for `gannet shards` (shards) and the digit captions (captions)."""
