"""Selectors: one small class per file, registered with `@register_selector` (see tunelab.selection.registry)."""
