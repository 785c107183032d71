"""Losses: pure functions of arrays. Math in float32; aggregation explicit."""
