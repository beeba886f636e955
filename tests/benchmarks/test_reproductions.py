"""benchmarks/reproductions.py: the verdict rule on hand-made spreads, the per-seed cache (skip, resume after a
failure, --force), a real claim end to end on the tiny model (shared runs reused, not retrained), the docs table
(missing claims shown as "not run yet" with their command) and the intruder-dimension count."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def repro():
    sys.path.insert(0, str(BENCH))
    try:
        import reproductions

        yield reproductions
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def lab(repro, tmp_path_factory):
    from _repro_lab import Lab

    return Lab(tmp_path_factory.mktemp("repro"), quick=True)


GE = (("x", ">=", 0.9),)


@pytest.mark.parametrize("values, expected", [
    ([0.95, 1.0, 0.9], "reproduced"),  # every seed on the claim's side (the threshold itself included by >=)
    ([0.5, 0.6, 0.89], "not reproduced"),
    ([0.8, 0.95, 1.0], "inconclusive"),  # the spread straddles the threshold
    ([0.95, math.nan, 1.0], "inconclusive"),  # an undefined measurement decides nothing
    ([], "not run yet"),
])
def test_verdict_one_check(repro, values, expected):
    assert repro.verdict([{"x": v} for v in values], GE) == expected


def test_verdict_strict_and_several_checks(repro):
    strict = (("gap", ">", 0.0),)
    assert repro.verdict([{"gap": 0.0}] * 3, strict) == "not reproduced"  # a tie is not "more"
    both = (("retained", ">=", 0.9), ("cut", ">=", 0.3))
    seeds = [{"retained": 1.0, "cut": 0.5}, {"retained": 0.95, "cut": 0.4}]
    assert repro.verdict(seeds, both) == "reproduced"
    assert repro.verdict([{**s, "cut": 0.1} for s in seeds], both) == "not reproduced"  # one check fails everywhere
    assert repro.verdict([seeds[0], {**seeds[1], "cut": 0.1}], both) == "inconclusive"


def test_cache_skips_resumes_and_forces(repro, lab):
    calls = []

    def fn(lab_, seed):
        calls.append(seed)
        if seed == 2 and calls.count(2) == 1:
            raise RuntimeError("interrupted")  # the first attempt at seed 2 dies mid-claim
        return {"x": 1.0 + seed}

    claim = replace(repro.CLAIMS["dare"], name="fake", fn=fn, checks=GE)
    with pytest.raises(RuntimeError):
        repro.run_claim(lab, claim, 3, log=lambda *_: None)
    assert calls == [0, 1, 2]
    assert [r["x"] for r in repro.cached(lab, "fake", 3)] == [1.0, 2.0]  # finished seeds kept
    results = repro.run_claim(lab, claim, 3, log=lambda *_: None)  # resume: only the missing seed runs
    assert calls == [0, 1, 2, 2] and [r["x"] for r in results] == [1.0, 2.0, 3.0]
    repro.run_claim(lab, claim, 3, log=lambda *_: None)
    assert calls == [0, 1, 2, 2]  # all cached
    repro.run_claim(lab, claim, 2, force=True, log=lambda *_: None)
    assert calls == [0, 1, 2, 2, 0, 1]
    saved = json.loads(repro.cache_path(lab, "fake", 0).read_text())
    assert saved["seed"] == 0 and saved["conditions"]["quick"] is True and not list(
        repro.cache_path(lab, "fake", 0).parent.glob("*.tmp-*"))


@pytest.mark.slow
def test_claims_share_runs_and_the_table_says_what_is_missing(repro, lab, tmp_path):
    (dare,) = repro.run_claim(lab, repro.CLAIMS["dare"], 1, log=lambda *_: None)
    assert {"em_base", "em_ft", "em_dare", "retained"} <= set(dare)
    runs = sorted((lab.root / "runs").iterdir())
    stamp = (runs[0] / "summary.json").stat().st_mtime_ns
    (wise,) = repro.run_claim(lab, repro.CLAIMS["wise_ft"], 1, log=lambda *_: None)
    assert sorted((lab.root / "runs").iterdir()) == runs  # the shared full fine-tune reused ...
    assert (runs[0] / "summary.json").stat().st_mtime_ns == stamp  # ... not retrained
    assert wise["em_ft"] == dare["em_ft"] and wise["ppl_base"] > 0
    assert not list((lab.root / "merges").iterdir())  # merge outputs deleted once scored
    docs = tmp_path / "reproductions.md"
    repro.write_docs(lab, 1, docs)
    text = docs.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `dare`"))
    assert f"`retained`: {repro.fmt(dare['retained'])}" in row
    row = next(line for line in text.splitlines() if line.startswith("| `ties`"))
    assert "not run yet: `python benchmarks/reproductions.py --only ties`" in row


def _checkpoint(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


def test_intruder_count(repro, tmp_path):
    from _repro_claims import intruder_counts

    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = torch.diag(torch.linspace(2.0, 1.0, 16))  # left singular vectors: the standard basis
    spike = torch.full((16,), 0.25)  # unit vector, |cos| = 0.25 with every basis vector: an intruder
    base = _checkpoint(tmp_path / "base", {name: w0, "model.norm.weight": torch.ones(16)})
    scaled = _checkpoint(tmp_path / "scaled", {name: 1.1 * w0})
    spiked = _checkpoint(tmp_path / "spiked", {name: w0 + 5.0 * torch.outer(spike, spike)})
    assert intruder_counts(str(base), scaled) == (0, 1)  # norms aren't matrices; same directions: none
    assert intruder_counts(str(base), spiked, k=1) == (1, 1)
