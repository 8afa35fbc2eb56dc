"""Benchmarks: data versions pinned by hash, typed prompt spans, and the protocols that turn a task into model inputs."""
