"""Layer 1: helpers that import nothing else of tunelab."""
