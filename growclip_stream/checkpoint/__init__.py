"""Durable checkpoints on any fsspec URL, and the checkpointer that decides when to take them.

- :mod:`.state`: :class:`TrainingState`, a CPU copy of everything a restart needs, captured on the
  training thread (the only part of a save training waits for);
- :mod:`.store`: :class:`CheckpointStore` writes each save to a new folder, fsynced, then moves
  ``LATEST``; loading verifies checksums and falls back to the newest usable checkpoint;
- :mod:`.manager`: :class:`CheckpointManager`, cadence, background writer, retries, failures.
"""

from growclip_stream.checkpoint.manager import CheckpointManager, CheckpointPolicy, SaveResult
from growclip_stream.checkpoint.state import (
    TrainingState,
    capture,
    global_rng_state,
    optimizer_tensors,
    pack_strings,
    python_rng_state,
    restore_global_rng,
    restore_optimizer,
    restore_python_rng,
    unpack_strings,
)
from growclip_stream.checkpoint.store import (
    FORMAT_VERSION,
    Checkpoint,
    Checkpointer,
    CheckpointError,
    CheckpointFormatError,
    CheckpointStore,
    Saved,
    load_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointManager",
    "CheckpointPolicy",
    "CheckpointStore",
    "Checkpointer",
    "SaveResult",
    "Saved",
    "TrainingState",
    "capture",
    "global_rng_state",
    "load_checkpoint",
    "optimizer_tensors",
    "pack_strings",
    "python_rng_state",
    "restore_global_rng",
    "restore_optimizer",
    "restore_python_rng",
    "unpack_strings",
]
