"""Training and evaluation inputs: seqio Tasks, their offline neighbour cache
(Beam), cached batches, the feature converter and the training data sources."""
