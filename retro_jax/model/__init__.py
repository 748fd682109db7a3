"""The RETRO network: attention layers, the decoder with chunked cross-
attention and its encoder, KV-cached decoding, FLOP counts."""
