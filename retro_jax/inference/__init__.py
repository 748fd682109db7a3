"""A trained run loaded for research (retro_jax.load) and sampling with
retrieval."""
