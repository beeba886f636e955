"""Every method that declares `capabilities.supports_sharding`, and the preference / SFT-variant / distillation /
reward-model objectives on LoRA and full fine-tuning, train under FSDP2 and ZeRO-3 on 2 processes as in 1 process
(3 steps, fp32, global batch 8); their exports match. The declaration is what `validate_sharding` trusts, so this is its
proof (tests/methods/test_capabilities.py checks the other capabilities in one process).

Tolerances: losses rel 1e-5 (measured: FSDP2 bit-identical or ~1e-7, ZeRO-3 ~1e-7); exports 1e-4 under FSDP2
and 2e-3 under ZeRO-3 (bucketed reductions: see test_deepspeed_multiprocess.py for why AdamW allows 2 lr).
The objectives with random input noise (NEFTune, Masked Thought) are left out: their noise is drawn per process,
so 2 processes draw other noise than 1, as under DDP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dist_util import max_abs_diff, max_rel_diff, run, torchrun
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).parent / "sharded_methods_run.py")
TESTS = str(Path(__file__).parents[1])  # for `tiny` in the worker


def _tensors(path: str) -> dict:
    (f,) = sorted(Path(path).glob("*.safetensors"))
    return load_file(str(f))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("one")
    run([sys.executable, WORKER, str(out), str(tiny_model_dir), "ddp"], timeout=3600, PYTHONPATH=_path())
    return json.loads((out / "one-1.json").read_text())


def _path() -> str:
    import os

    return os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])


@pytest.mark.parametrize("backend,weights_tol", [("fsdp", 1e-4), ("deepspeed", 2e-3)])
def test_declared_methods_and_objectives_train_sharded_as_in_one_process(backend, weights_tol, one_process,
                                                                        tmp_path, tiny_model_dir):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    run(torchrun(2, WORKER, str(tmp_path), str(tiny_model_dir), backend), timeout=3600, PYTHONPATH=_path())
    two = json.loads((tmp_path / f"{backend}-2.json").read_text())
    assert two.keys() == one_process.keys()
    failed = {k: v["error"] for k, v in two.items() if "error" in v}
    assert not failed, failed
    worst = {"loss": 0.0, "export": 0.0}
    for key, ref in one_process.items():
        assert "error" not in ref, (key, ref)
        loss = max_rel_diff(ref["losses"], two[key]["losses"])
        assert loss <= 1e-5, (key, ref["losses"], two[key]["losses"])
        for kind, where in ref["exports"].items():
            if where.startswith("skipped"):
                assert two[key]["exports"][kind].startswith("skipped"), (key, kind)
                continue
            diff = max_abs_diff(_tensors(where), _tensors(two[key]["exports"][kind]))
            assert diff <= weights_tol, (key, kind, diff)
            worst["export"] = max(worst["export"], diff)
        worst["loss"] = max(worst["loss"], loss)
    print(f"\n{backend}: {len(two)} method/objective runs; worst loss rel diff {worst['loss']:.2e}, worst export "
          f"abs diff {worst['export']:.2e}")
