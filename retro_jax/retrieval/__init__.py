"""Retrieval: the frozen BERT embedder, the chunk database, the index and the
k-nearest-neighbour search that RETRO's training data and sampling read."""
