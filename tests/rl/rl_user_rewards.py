"""User reward functions for the tests (loaded by path as `function` rewards)."""


def vowels(prompts, completions, **kwargs):
    """A reward that varies between samples of a tiny random model: the share of vowels in the completion."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def explodes_on_e(prompts, completions, **kwargs):
    """Raises on completions containing 'e' (a buggy user reward); 1.0 otherwise."""
    out = []
    for c in completions:
        if "e" in c:
            raise RuntimeError("boom")
        out.append(1.0)
    return out
