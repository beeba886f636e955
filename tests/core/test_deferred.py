"""`import tunelab` then `import peft` leaves bitsandbytes unimported (core/deferred.py), LoRA is added without it,
and code that uses bitsandbytes (its quantised layers under PEFT, submodule imports) works as before. Each check
runs in a fresh interpreter: whether a package was imported is a property of the whole process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
SRC = str(Path(__file__).parents[2] / "src")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=1800)


def test_peft_and_lora_without_importing_bitsandbytes(tiny_model_dir):
    res = _run(f"""
        import sys
        import tunelab
        import peft
        import peft.helpers
        assert "bitsandbytes" not in sys.modules, "import peft imported bitsandbytes"
        from tunelab.methods.lora import LoRAOptions, lora_peft_config, wrap_peft
        from tunelab.model import load_model
        from tunelab.recipe import ModelConfig
        model = wrap_peft(load_model(ModelConfig(name_or_path={str(tiny_model_dir)!r})),
                          lora_peft_config(LoRAOptions(r=2)))
        assert "bitsandbytes" not in sys.modules, "adding LoRA imported bitsandbytes"
        assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
        from peft.import_utils import is_bnb_available
        import peft.tuners.lora.model as lora_model
        assert lora_model.is_bnb_available is is_bnb_available  # PEFT's checks put back after the wrap
        # the stand-in peft/helpers.py holds reads through to the real package, which is then imported once
        from bitsandbytes.nn import Linear4bit
        import bitsandbytes
        assert peft.helpers.bnb.nn.Linear4bit is Linear4bit is bitsandbytes.nn.Linear4bit
        assert type(sys.modules["bitsandbytes"]).__name__ == "module"
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_bitsandbytes_layers_still_get_peft_bitsandbytes_lora():
    """A base holding bitsandbytes' quantised layers (QLoRA through PEFT) is dispatched to PEFT's bnb LoRA layer,
    and the kernels-community notice bitsandbytes logs on avx512_bf16 CPUs is not shown."""
    res = _run("""
        import logging, sys
        logging.basicConfig(level=logging.INFO)  # a user's own logging: the notice would show here
        import tunelab
        import peft
        import torch
        import bitsandbytes as bnb
        from tunelab.methods.lora import no_bnb_dispatch
        from tunelab.core.deferred import bitsandbytes_loaded
        base = torch.nn.Sequential()
        base.add_module("proj", bnb.nn.Linear8bitLt(16, 16, bias=False, has_fp16_weights=False))
        base.is_loaded_in_8bit = True  # what transformers sets on a model it loaded with load_in_8bit
        assert bitsandbytes_loaded()
        with no_bnb_dispatch():
            model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["proj"]))
        import peft.tuners.lora.bnb as lora_bnb
        assert isinstance(model.base_model.model.proj, lora_bnb.Linear8bitLt), type(model.base_model.model.proj)
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    assert "gemm_4bit_forward" not in res.stderr
