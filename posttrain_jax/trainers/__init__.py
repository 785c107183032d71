"""Trainers: wiring only. Each is a short `main(config)` over the shared machinery."""
