"""Corpus readers and vocabularies (knows nothing of retrieval or models)."""
