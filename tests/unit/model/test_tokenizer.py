import pytest
import torch

from growclip_stream.model.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer, trim_padding


def test_ids_and_shape() -> None:
    assert (PAD_ID, BOS_ID, EOS_ID, VOCAB_SIZE) == (256, 257, 258, 259)
    out = ByteTokenizer(10).encode(["hi", "abc"])
    assert out.shape == (2, 10) and out.dtype == torch.int64
    assert out[0].tolist() == [BOS_ID, ord("h"), ord("i"), EOS_ID] + [PAD_ID] * 6
    assert out[1].tolist() == [BOS_ID, 97, 98, 99, EOS_ID] + [PAD_ID] * 5


def test_empty_string_and_empty_batch() -> None:
    tok = ByteTokenizer(4)
    assert tok.encode([""])[0].tolist() == [BOS_ID, EOS_ID, PAD_ID, PAD_ID]
    assert tok.encode([]).shape == (0, 4)


def test_long_text_is_truncated_and_keeps_eos() -> None:
    out = ByteTokenizer(8).encode(["x" * 100])[0].tolist()
    assert out == [BOS_ID] + [ord("x")] * 6 + [EOS_ID]


@pytest.mark.parametrize("context_length", [8, 9, 10, 11])
def test_multibyte_truncation_keeps_eos_and_whole_characters(context_length: int) -> None:
    tok = ByteTokenizer(context_length)
    text = "é🙂" * 20  # 2-byte and 4-byte characters
    row = tok.encode([text])[0]
    assert row[0] == BOS_ID
    assert (row == EOS_ID).sum() == 1  # EOS always present, exactly once
    decoded = tok.decode(row)
    assert text.startswith(decoded) and decoded  # a prefix made of whole characters
    assert len(decoded.encode()) <= context_length - 2


def test_any_input_encodes() -> None:
    tok = ByteTokenizer(16)
    row = tok.encode(["\ud800 lone surrogate", "\x00\n\t"])  # never raises
    assert (row == EOS_ID).sum() == 2
    assert tok.decode(tok.encode(["héllo wörld"])[0]) == "héllo wörld"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="context_length"):
        ByteTokenizer(1)
    with pytest.raises(TypeError):
        ByteTokenizer(8).encode("not a list")


def test_trim_padding_cuts_after_the_longest_texts_first_eos() -> None:
    tokens = ByteTokenizer(16).encode(["ab", "abcd", ""])
    trimmed = trim_padding(tokens)
    assert trimmed.shape == (3, 6)  # BOS, 4 bytes, EOS of the longest
    assert torch.equal(trimmed, tokens[:, :6])
    no_eos = torch.tensor([[BOS_ID, 97, 98, PAD_ID], [BOS_ID, EOS_ID, PAD_ID, PAD_ID]])
    assert trim_padding(no_eos).shape == (2, 2)  # the row without EOS is read at position 0
    assert trim_padding(torch.zeros((0, 16), dtype=torch.int64)).shape == (0, 16)


@pytest.mark.parametrize("context_length", [2, 5, 16, 64])
def test_length_counts_what_encode_gives_without_encoding(context_length: int) -> None:
    tok = ByteTokenizer(context_length)
    texts = ["", "ab", "an ankle boot", "é" * 40, "x" * 500, "\ud800 lone surrogate", "日本語のキャプション"]
    encoded = tok.encode(texts)
    assert [tok.length(t) for t in texts] == (encoded != PAD_ID).sum(dim=1).tolist()
