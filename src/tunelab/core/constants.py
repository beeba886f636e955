"""Constants shared across layers."""

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, padding); torch's cross_entropy default
