"""Reading a run's checkpoint whatever wrote it: the one place that knows every checkpoint format.

`checkpoint.py` reads the plain format (trainable.safetensors + optimizer.pt) and names damaged files; the sharded
formats belong to the backends that write them (`dcp.py`: torch.distributed.checkpoint shards of FSDP2;
`deepspeed_backend.py`: ZeRO partitions), which build on `checkpoint.py`. This module imports all three and hands
the sharded readers to `checkpoint.load_checkpoint`, so none of them imports another (no cycle within `train/`).
Used where a checkpoint is read outside training (`assemble.restore_run`: `tunelab eval/export RUN`); a training
resume goes through the backend's own `load_checkpoint`, which re-shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.train import checkpoint, dcp, deepspeed_backend

# state.json's "checkpoint_format" -> its trainable tensors, gathered whole in this one process
SHARDED_READERS = {dcp.FORMAT: dcp.read_trainable, deepspeed_backend.FORMAT: deepspeed_backend.read_trainable}


def read_checkpoint(path: Path, rank: int = 0) -> dict[str, Any]:
    """Every file of checkpoint `path`, in any format (`checkpoint.load_checkpoint`: state, trainable tensors,
    optimizer state or None for a sharded checkpoint, this process's RNG state); CheckpointError names a damaged
    file."""
    return checkpoint.load_checkpoint(path, rank, sharded_readers=SHARDED_READERS)
