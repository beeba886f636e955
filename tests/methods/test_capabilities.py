"""Every registered method's `capabilities` declaration matches what the method does: the assembler
(`tunelab.assemble`), the runner and the loop read the declaration and never probe for attributes, so a wrong
one would silently skip calibration, the run length or the adapter-disabled reference."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_METHOD_OPTIONS, build_tiny_model

from tunelab.methods._peft_common import CalibrationMissing
from tunelab.methods.registry import Capabilities, Method, get_method_class, list_methods

CASES = [(name, TINY_METHOD_OPTIONS.get(name, {})) for name in sorted(list_methods())]
CASES.append(("mezo", {"params": "lora", "r": 4, "alpha": 8}))  # its capabilities depend on its options


def calibration_batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 256, (4, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def probing(cls: type[Method]) -> tuple[type[Method], list[int]]:
    """A subclass that records every read of `total_steps` (the run length a method may need in prepare)."""
    reads: list[int] = []

    class Probe(cls):  # type: ignore[valid-type, misc]
        @property
        def total_steps(self):  # type: ignore[override]
            reads.append(1)
            return 50

        @total_steps.setter
        def total_steps(self, value):
            pass

    return Probe, reads


def test_the_default_declares_nothing():
    assert Method.capabilities == Capabilities()
    assert not any(vars(Capabilities()).values())


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}{'-' + '-'.join(o) if o else ''}" for n, o in CASES])
def test_declaration_matches_behaviour(name, options):
    from peft import PeftModel

    cls = get_method_class(name)
    probe, reads = probing(cls)
    method = probe(cls.Config.model_validate(options))
    caps = method.capabilities
    # the hooks a declaration promises are implemented, and only those
    assert caps.custom_step == (cls.custom_step is not Method.custom_step), name
    assert caps.calibrates_from_examples == (cls.calibrate_from_examples is not Method.calibrate_from_examples), name
    if caps.needs_calibration:
        assert cls.calibrate is not Method.calibrate and method.n_calibration_batches > 0, name
        with pytest.raises(CalibrationMissing):  # it really cannot be prepared without the data
            method.prepare(build_tiny_model(256, seed=0))
        model = build_tiny_model(256, seed=0)
        method.calibrate(model, calibration_batches(method.n_calibration_batches))
    else:
        model = build_tiny_model(256, seed=0)
    reads.clear()
    prepared = method.prepare(model)
    assert bool(reads) == caps.needs_run_length, f"{name}: reads total_steps in prepare: {bool(reads)}"
    # an adapter method returns a PEFT wrapper whose adapter the references disable
    assert isinstance(prepared, PeftModel) == caps.is_adapter, f"{name}: {type(prepared).__name__}"
    if caps.calibrates_from_examples:  # prepared without its calibration, it refuses to train
        with pytest.raises(RuntimeError, match="calibrat"):
            method.param_groups(prepared, 0.0)
    else:
        assert sum(len(g["params"]) for g in method.param_groups(prepared, 0.0)) > 0, name
