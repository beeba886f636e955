"""Rewards of on-line RL (layer 5): verifiers, format and length rewards, user functions, LLM judges and reward
models, each a registered class with a typed Config (`tunelab rewards` lists them; docs/rl.md)."""
