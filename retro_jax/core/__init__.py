"""Foundations every role uses: file I/O (local or gs://), the device mesh and
sharding rules, host memory, the entry points' flag parsing. Imports nothing
else of retro_jax."""
