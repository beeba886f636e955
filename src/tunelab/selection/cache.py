"""Score cache: one .npz per (data, scorer config, model) so re-running a selection or a recipe re-scores nothing.

Key = sha256 of {data: sha256 over the scored records in order, scorer: name + options, identity: the
scorer's models (name + a fingerprint of their files)}. Files are written atomically (temp + rename).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.core.io import atomic_file
from tunelab.selection.registry import ScoreOutput


def data_hash(rows: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(data: str, scorer: str, options: dict[str, Any], identity: dict[str, Any]) -> str:
    blob = json.dumps({"data": data, "scorer": scorer, "options": options, "identity": identity}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ScoreCache:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def path(self, scorer: str, key: str) -> Path:
        return self.dir / f"{scorer}-{key[:20]}.npz"

    def load(self, scorer: str, key: str) -> ScoreOutput | None:
        p = self.path(scorer, key)
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            cols = {k.removeprefix("col_"): z[k] for k in z.files if k.startswith("col_")}
            return ScoreOutput(z["values"], z["valid"] if "valid" in z.files else None, cols)

    def save(self, scorer: str, key: str, out: ScoreOutput) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(scorer, key)
        arrays = {"values": np.asarray(out.values), "key": np.asarray(key)}
        if out.valid is not None:
            arrays["valid"] = np.asarray(out.valid, bool)
        arrays.update({f"col_{k}": np.asarray(v) for k, v in out.columns.items()})
        with atomic_file(p, suffix=".npz") as tmp:  # np.savez appends .npz to any other name
            np.savez(tmp, **arrays)
        return p
