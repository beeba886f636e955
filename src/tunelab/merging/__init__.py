"""Weight-space operations behind ``tunelab merge`` (see docs/merging.md).

* :mod:`.ops` - pure per-tensor operations (soups, task arithmetic, TIES, DARE, SLERP, WiSE-FT,
  Model Stock, LiNeS, fine-tuning transfer).
* :mod:`.soup` - state-dict level helpers, greedy soup and the WiSE-FT sweep (``score_fn``).
* :mod:`.score` - the held-out score the CLI gives them (exact match or loss on built-in tasks).
* :mod:`.compress` - BitDelta and SVD low-rank delta compression (``merge_method: bitdelta | svd_delta``).
* :mod:`.lora` - LoRA-level merging of adapters (linear on factors, concatenation, SVD).
* :mod:`tunelab.weights` (one layer down, shared with diagnostics) - lazy safetensors / PEFT adapter reading and
  atomic checkpoint writing.
* :mod:`.resolve` - what a model reference means (checkpoint, adapter, tunelab run dir, alias).
* :mod:`.recipe`, :mod:`.run` - mergekit-shaped recipe and :func:`run_merge`.
"""

from . import compress, lora, ops, soup
from .compress import Compressed, DeltaCompressor, bitdelta_compress, svd_compress
from .recipe import Recipe, load_recipe
from .resolve import resolve_recipe, resolve_ref
from .run import run_merge
from .score import TaskScorer
from .soup import greedy_soup, wise_ft_sweep

__all__ = [
    "ops",
    "soup",
    "compress",
    "lora",
    "Recipe",
    "load_recipe",
    "resolve_recipe",
    "resolve_ref",
    "run_merge",
    "TaskScorer",
    "greedy_soup",
    "wise_ft_sweep",
    "bitdelta_compress",
    "svd_compress",
    "DeltaCompressor",
    "Compressed",
]
