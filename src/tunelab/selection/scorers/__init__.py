"""Scorers: one small class per file, registered with `@register_scorer` (see tunelab.selection.registry)."""
