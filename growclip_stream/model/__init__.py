"""The GrowCLIP model (towers, shared encoder, growable config) and its byte-level tokenizer."""

from growclip_stream.model.clip import (
    TOWER_NAMES,
    ArchConfig,
    ClipLoss,
    ClipOutput,
    GrowCLIP,
    TowerConfig,
    TowerName,
)
from growclip_stream.model.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "TOWER_NAMES",
    "VOCAB_SIZE",
    "ArchConfig",
    "ByteTokenizer",
    "ClipLoss",
    "ClipOutput",
    "GrowCLIP",
    "TowerConfig",
    "TowerName",
]
