"""Ahead-of-time compilation of a train step for a named TPU topology, on any host (`posttrain-jax compile`)."""
