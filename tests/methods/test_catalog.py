"""The method catalogue: every registered method declares its paper, what trains, whether it merges and its
adapter format; those declarations match what its export code does; docs/methods.md lists every method with
the generated table (`tunelab methods --markdown`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import TINY_METHOD_OPTIONS, build_tiny_model

from tunelab.methods._catalog import (
    ADAPTER_FORMATS,
    method_options_text,
    methods_markdown,
    options_anchor,
    options_markdown,
)
from tunelab.methods.registry import ExportUnsupported, build_method, list_methods

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"
CALIBRATED = {"corda", "eva", "lora_ga"}  # need training batches before prepare (covered elsewhere)


def test_every_method_declares_its_catalogue_entry():
    for name, cls in list_methods().items():
        assert cls.paper and cls.paper.startswith("https://"), name
        assert isinstance(cls.trains, str) and len(cls.trains) > 5, f"{name}: set `trains` on the class"
        assert isinstance(cls.mergeable, bool), name
        assert cls.adapter_format is None or cls.adapter_format in ADAPTER_FORMATS, name


@pytest.mark.parametrize("name", sorted(set(list_methods()) - CALIBRATED))
def test_declarations_match_the_export_code(name, tmp_path):
    method = build_method(name, TINY_METHOD_OPTIONS.get(name, {}))
    model = method.prepare(build_tiny_model(256, seed=0))
    try:
        method.save_adapter(model, str(tmp_path / "adapter"))
        saved = True
    except ExportUnsupported:
        saved = False
    assert saved == (method.adapter_format is not None), f"{name}: adapter_format={method.adapter_format!r}"
    if saved:
        files = {p.name for p in (tmp_path / "adapter").iterdir()}
        expected = {"peft": "adapter_model.safetensors", "tunelab": "tunelab_adapter.safetensors",
                    "sparse_delta": "sparse_delta.safetensors"}[method.adapter_format]
        assert expected in files, (name, files)
    try:
        merged = method.merged_model(model)
        assert isinstance(merged, torch.nn.Module)
        assert not any(n.startswith("base_model.") for n, _ in merged.named_parameters()), f"{name}: still wrapped"
        mergeable = True
    except ExportUnsupported:
        mergeable = False
    assert mergeable == method.mergeable, f"{name}: mergeable={method.mergeable}"


def test_docs_list_every_method_with_the_generated_table():
    doc = DOC.read_text()
    assert methods_markdown() in doc, "docs/methods.md is stale: regenerate its table from `tunelab methods --markdown`"
    for name in list_methods():
        assert f"`{name}`" in doc, name


def test_docs_have_every_methods_options_linked_from_the_table():
    import re

    doc = DOC.read_text()
    assert options_markdown() in doc, "docs/methods.md's options are stale: regenerate (`tunelab methods --markdown`)"
    # GitHub's anchor of a heading: lower case, code marks dropped, spaces as dashes
    headings = {"#" + h.replace("`", "").strip().lower().replace(" ", "-")
                for h in re.findall(r"^### (.+)$", doc, re.M)}
    for name in list_methods():
        assert f"[options]({options_anchor(name)})" in methods_markdown(), name
        assert options_anchor(name) in headings, f"{name}: the table links to a heading that does not exist"


def test_every_option_says_what_it_means():
    for name, cls in list_methods().items():
        for field, info in cls.Config.model_fields.items():
            assert info.description and len(info.description) > 10, f"{name}.{field}: add description= to its Field"


def test_one_methods_options_with_defaults_and_meaning():
    text = method_options_text("lora")
    assert "rslora: bool = false" in text and "alpha/sqrt(r)" in text
    assert "target_modules: list[str] | str = [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]" in text
    assert "options: none" in method_options_text("full")
    assert "mode: ipm | kpm = ipm" in method_options_text("corda")
