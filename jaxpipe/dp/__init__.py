"""Data parallelism: algorithms that keep the replicas of a stage in agreement."""
