"""Offline byte-level tokenizer.

Why bytes: the daemon runs where no vocabulary can be downloaded at run time, so the tokenizer must
ship no data files; and a stream of captions may hold any text (any script, emoji, stray control
characters). Using the 256 UTF-8 byte values as tokens needs no vocabulary and never fails on any
input: every string has a UTF-8 encoding (lone surrogates are replaced), and every byte is a token.
The cost is longer sequences than a BPE vocabulary gives, which is fine for short captions.

Ids: 0..255 are the bytes, then three special tokens. A sequence is
``BOS, bytes..., EOS, PAD, PAD, ...`` of exactly ``context_length`` ids. Long captions are cut to
``context_length - 2`` bytes, at a character boundary, so that EOS (the token the text tower pools)
is always present.

A batch can be cut after its longest caption (:func:`trim_padding`) without changing any
embedding: the text tower is causal and pools the first EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259


def _truncate_utf8(data: bytes, limit: int) -> bytes:
    """Cut ``data`` to at most ``limit`` bytes without leaving a partial multi-byte character."""
    if len(data) <= limit:
        return data
    # Decoding with errors="ignore" drops only the incomplete sequence at the cut.
    return data[:limit].decode("utf-8", errors="ignore").encode("utf-8")


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` (B, T) cut after the batch's last first-EOS: the same embeddings, less work.

    Why it is exact: under causal attention a position sees only the ones before it, and the text
    tower reads out each row at its first EOS, so the columns after every row's first EOS never
    reach an output. Captions are short (a Fashion-MNIST caption is a median 32 tokens of the 64),
    so a forward pass over the trimmed batch costs about half. A row without EOS is read out at
    position 0 and keeps at least that column. A CPU tensor: the cut length is read on the host.
    """
    if tokens.numel() == 0:
        return tokens
    first_eos = (tokens == EOS_ID).int().argmax(dim=1)  # (B,) 0 where a row has none
    return tokens[:, : int(first_eos.max()) + 1]


class ByteTokenizer:
    """Turns strings into fixed-length id tensors: ``BOS, utf-8 bytes, EOS, PAD...``."""

    def __init__(self, context_length: int) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for BOS and EOS), got {context_length}")
        self.context_length = context_length

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode a batch of strings to a (B, context_length) int64 tensor.

        Filled through numpy, a row's bytes in one copy: building a tensor per caption from a list
        of ints cost more than the model's forward pass on serving's event loop and batchers."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings, not a single string")
        return self.frame([self.truncate(text) for text in texts])

    def frame(self, rows: Sequence[bytes]) -> torch.Tensor:
        """(B, context_length) ids of byte rows: ``BOS, bytes..., EOS, PAD...``, each row cut to
        ``context_length - 2`` bytes as it is (strings are cut at a character boundary first by
        :meth:`truncate`; token-id rows are cut plainly)."""
        out = np.full((len(rows), self.context_length), PAD_ID, dtype=np.int64)
        out[:, 0] = BOS_ID
        for i, row in enumerate(rows):
            data = row[: self.context_length - 2]
            out[i, 1 : len(data) + 1] = np.frombuffer(data, dtype=np.uint8)
            out[i, len(data) + 1] = EOS_ID
        return torch.from_numpy(out)

    def truncate(self, text: str) -> bytes:
        """The UTF-8 bytes of ``text`` that ``encode`` keeps: at most ``context_length - 2``, cut at a
        character boundary."""
        return _truncate_utf8(text.encode("utf-8", errors="replace"), self.context_length - 2)

    def length(self, text: str) -> int:
        """Tokens ``encode`` gives ``text`` before padding (BOS and EOS included), without encoding."""
        return len(self.truncate(text)) + 2

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Inverse of ``encode`` for one sequence: the bytes up to the first EOS (for debugging)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        data = bytearray()
        for v in values:
            if v == EOS_ID:
                break
            if v < 256:
                data.append(v)
        return data.decode("utf-8", errors="replace")
