"""bitsandbytes imported only when something uses it.

PEFT imports bitsandbytes at `import peft` (peft/helpers.py: `try: import bitsandbytes as bnb`, for one helper
that dequantises bitsandbytes weights) and each time it adds adapter layers (peft/tuners/lora/model.py's dispatch:
`is_bnb_4bit_available()` reads `bnb.nn`), to recognise a base model's quantised bitsandbytes layers. Importing it
costs seconds of CPU in every process (its default backend imports torch.compile's inductor stack), and on CPUs
with avx512_bf16 its CPU backend asks the `kernels` package for a hub kernel and logs, in every process:

    Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository
    'kernels-community/quantization-bitsandbytes' could not verify publisher trust status. ...

`defer_bitsandbytes()` (run by `import tunelab`) changes two things, and nothing for code that uses bitsandbytes:
  * while peft/helpers.py runs (a meta-path finder wraps that one module's loader), `import bitsandbytes` gives it
    a stand-in module that imports the real package on its first attribute read and forwards to it; the stand-in
    leaves `sys.modules` as soon as peft/helpers.py is done, so any other `import bitsandbytes[.x]` is the real
    import, and `find_spec` still finds the package (PEFT and transformers still see it installed);
  * the kernels-community line is dropped from bitsandbytes' CPU-backend logger (what it announces, the PyTorch
    fallback, is what runs; an offline machine cannot verify the hub kernel anyway).
`bitsandbytes_loaded()` tells whether the real package was imported: until it is, no module of any model can be
a bitsandbytes layer, and `methods/_peft_common.no_bnb_dispatch` lets PEFT skip its bitsandbytes dispatch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import types

NAME = "bitsandbytes"
_USER = "peft.helpers"  # the module that imports bitsandbytes at `import peft`
_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _Deferred(types.ModuleType):
    """Stands in for the installed package: any attribute it lacks imports the real one and is read from it."""

    def __getattr__(self, attr: str):
        if sys.modules.get(NAME) is self:
            del sys.modules[NAME]  # the import system then runs the package itself
        return getattr(importlib.import_module(NAME), attr)


class _StandInWhileExecuting(importlib.abc.Loader):
    """`_USER`'s own loader, run with the stand-in in `sys.modules` (removed afterwards)."""

    def __init__(self, loader, spec):
        self.loader, self.spec = loader, spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        stand_in = None
        if NAME not in sys.modules:
            stand_in = _Deferred(NAME)
            stand_in.__spec__, stand_in.__loader__, stand_in.__package__ = self.spec, self.spec.loader, NAME
            sys.modules[NAME] = stand_in
        try:
            self.loader.exec_module(module)
        finally:
            if stand_in is not None and sys.modules.get(NAME) is stand_in:
                del sys.modules[NAME]

    def __getattr__(self, attr: str):  # get_source, get_filename, ...: the wrapped loader's
        if attr in ("loader", "spec"):
            raise AttributeError(attr)
        return getattr(self.loader, attr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _USER or NAME in sys.modules:
            return None
        bnb = importlib.util.find_spec(NAME)
        if bnb is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _StandInWhileExecuting(spec.loader, bnb)
                return spec
        return None


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOTICE)


def defer_bitsandbytes() -> None:
    """Install the finder and the log filter (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    noisy = logging.getLogger(f"{NAME}.backends.cpu.ops")
    if not any(isinstance(f, _DropNotice) for f in noisy.filters):
        noisy.addFilter(_DropNotice())


def bitsandbytes_loaded() -> bool:
    """Whether the real bitsandbytes has been imported (only then can a model hold its layers)."""
    return isinstance(sys.modules.get(NAME), types.ModuleType) and not isinstance(sys.modules[NAME], _Deferred)
