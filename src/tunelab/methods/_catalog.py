"""docs/methods.md's generated parts, and `tunelab methods NAME`, from the registered Method classes.

Each class carries `paper` (from `@register`), `trains`, `mergeable` and `adapter_format` (see `registry.Method`),
and its pydantic `Config`, whose fields (default, `description=`) are the method's options. `tunelab methods
--markdown` prints the table (`methods_markdown`, each row linking to the method's options) and the options
(`options_markdown`); a test checks that docs/methods.md contains both verbatim.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic.fields import FieldInfo

from tunelab.methods.registry import Method, get_method_class, list_methods

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


def options_anchor(name: str) -> str:
    """The in-page link target of the heading `### <name> options` (name in backticks) as GitHub renders it."""
    return f"#{name}-options"


def methods_markdown() -> str:
    """One row per registered method: name, paper, what trains, mergeable, export, a link to its options."""
    lines = ["| method | paper | what trains | merges | export | options |", "|---|---|---|---|---|---|"]
    for name, cls in list_methods().items():
        lines.append(f"| `{name}` | {paper_link(cls.paper)} | {cls.trains} | {'yes' if cls.mergeable else 'no'} | "
                     f"{export_formats(cls)} | [options]({options_anchor(name)}) |")
    return "\n".join(lines)


def type_name(annotation: Any) -> str:
    """A field's type as a user writes it in YAML: `int`, `list[str] | str`, `ipm | kpm` (a Literal's values)."""
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(v) for v in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def default_of(info: FieldInfo) -> str:
    """A field's default as it would be written in a recipe (YAML flow style: `16`, `null`, `[q_proj, k_proj]`)."""
    import yaml

    value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1]


def option_rows(cls: type[Method]) -> list[tuple[str, str, str, str]]:
    """(option, type, default, meaning) for each field of the method's Config, in declaration order."""
    rows = []
    for field, info in cls.Config.model_fields.items():
        rows.append((field, type_name(info.annotation), default_of(info), info.description or ""))
    return rows


def method_options_text(name: str) -> str:
    """What `tunelab methods NAME` prints: the paper, what trains, and every option with default and meaning."""
    cls = get_method_class(name)
    lines = [f"{name}: {cls.trains}", f"paper: {cls.paper or '-'}",
             f"merges: {'yes' if cls.mergeable else 'no'}; export: {export_formats(cls) or 'none'}"]
    rows = option_rows(cls)
    if not rows:
        lines.append(f"options: none (recipe: `method: {{name: {name}}}`)")
        return "\n".join(lines)
    lines.append(f"options (recipe: `method: {{name: {name}, {rows[0][0]}: ...}}`, or `method.{rows[0][0]}=...`):")
    for opt, kind, default, meaning in rows:
        lines.append(f"  {opt}: {kind} = {default}")
        lines.append(f"      {meaning}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def options_markdown() -> str:
    """A section per registered method: its options with type, default and meaning (from its Config)."""
    out = []
    for name, cls in list_methods().items():
        out.append(f"### `{name}` options")
        out.append("")
        rows = option_rows(cls)
        if not rows:
            out.append("No options.")
        else:
            out.append("| option | type | default | meaning |")
            out.append("|---|---|---|---|")
            out += [f"| `{o}` | {_cell(k)} | `{_cell(d)}` | {_cell(m)} |" for o, k, d, m in rows]
        out.append("")
    return "\n".join(out).rstrip() + "\n"
