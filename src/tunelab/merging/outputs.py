"""Files of a merged checkpoint that are not copied from the reference model: ``config.json`` with the number of
stacked layers (slices), and the tokenizer files of ``tokenizer_source``."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from tunelab.weights import resolve_model_path

from .recipe import Recipe
from .resolve import resolve_ref


def output_files(r: Recipe, ref_config: dict[str, Any], out_layers: int | None, base: Path | None, ref_path: Path,
                 input_paths: list[Path]) -> dict[str, str | bytes]:
    """Files that replace the copied ones: config.json with the stacked layer count `out_layers` (slices), the
    tokenizer of ``tokenizer_source`` (`base`: the base model's dir, `ref_path`: the reference checkpoint the
    other files are copied from, `input_paths`: the input checkpoints, whose vocabularies must agree)."""
    files: dict[str, str | bytes] = {}
    if out_layers is not None and out_layers != ref_config.get("num_hidden_layers"):
        cfg = dict(ref_config, num_hidden_layers=out_layers)
        if r.torch_dtype is not None:
            cfg["dtype"] = r.dtype
        files["config.json"] = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    if r.tokenizer_source is not None:
        files.update(tokenizer_files(r, base, ref_path, input_paths))
    return files


def tokenizer_files(r: Recipe, base: Path | None, ref_path: Path, input_paths: list[Path]) -> dict[str, str | bytes]:
    """The tokenizer files of ``tokenizer_source`` (``base``, ``union`` or a model). Every input must have the
    same vocabulary: mergekit would re-map embedding rows between differing ones, which tunelab does not do."""
    src = r.tokenizer_source
    if src == "base":
        if base is None:
            raise ValueError("tokenizer_source: base needs base_model")
        where = base
    elif src == "union":
        where = ref_path
    else:
        where = resolve_model_path(resolve_ref(src))  # type: ignore[arg-type]
    vocabs = {p: _vocab(p) for p in [where, *input_paths]}
    known = {p: v for p, v in vocabs.items() if v is not None}
    if len({json.dumps(v, sort_keys=True) for v in known.values()}) > 1:
        raise ValueError(f"tokenizer_source: {src}: the inputs' vocabularies differ ({', '.join(map(str, known))}); "
                         "merging models with different vocabularies is not supported")
    return {f.name: f.read_bytes() for f in sorted(where.iterdir())
            if f.is_file() and any(fnmatch.fnmatch(f.name, pat) for pat in TOKENIZER_PATTERNS)}


TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                      "spiece.model", "*.tiktoken", "chat_template*")


def _vocab(path: Path) -> dict | None:
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text(encoding="utf-8"))
    return {"vocab": data.get("model", {}).get("vocab"), "added": [(a["id"], a["content"])
                                                                   for a in data.get("added_tokens", [])]}
