"""The causal GPT-3 model and its per-layer parameter layout."""
