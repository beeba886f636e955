"""The static columns of docs/methods.md, generated from the registered Method classes.

Each class carries `paper` (from `@register`), `trains`, `mergeable` and `adapter_format` (see `registry.Method`);
`tunelab methods --markdown` prints this table, and a test checks that docs/methods.md contains it verbatim.
"""

from __future__ import annotations

from tunelab.methods.registry import Method, list_methods

ADAPTER_FORMATS = {
    "peft": "PEFT adapter",
    "tunelab": "tunelab adapter (`tunelab_adapter.safetensors`)",
    "sparse_delta": "sparse delta (`sparse_delta.safetensors`)",
}


def export_formats(cls: type[Method]) -> str:
    """What `tunelab export` writes for the method (with its default options)."""
    parts = []
    if cls.adapter_format is not None:
        text = ADAPTER_FORMATS[cls.adapter_format]
        if getattr(cls, "mutates_base", False):
            text += " (converted to a plain LoRA on the original base)"
        parts.append(text)
    if cls.mergeable:
        parts.append("merged HF model")
    return " + ".join(parts)


def paper_link(url: str | None) -> str:
    if not url:
        return "-"
    label = url.rstrip("/").rsplit("/", 1)[-1] if "arxiv.org" in url else url
    return f"[{label}]({url})"


def methods_markdown() -> str:
    """One row per registered method: name, paper, what trains, mergeable, export."""
    lines = ["| method | paper | what trains | merges | export |", "|---|---|---|---|---|"]
    for name, cls in list_methods().items():
        lines.append(f"| `{name}` | {paper_link(cls.paper)} | {cls.trains} | {'yes' if cls.mergeable else 'no'} | "
                     f"{export_formats(cls)} |")
    return "\n".join(lines)
