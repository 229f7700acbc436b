"""The tensor codec: exact round trips, and every way a payload is refused."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import DecodeError
from schemas.messages import TensorPayload
from schemas.tensors import (
    ALLOWED_DTYPES,
    decode_tensors,
    encode_tensors,
    sha256_hex,
    tensors_from_bytes,
    tensors_to_bytes,
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.randn(
            4, 16, generator=gen
        ).to(dtype),
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": torch.randn(
            16, 4, generator=gen
        ).to(dtype),
        "base_model.model.classifier.bias": torch.randn(2, generator=gen).to(dtype),
        "scalar": torch.tensor(3.25, dtype=dtype),
    }


def _payload(data: bytes) -> TensorPayload:
    """A payload whose checksum and size match ``data`` (so only the content is judged)."""
    return TensorPayload(data=data, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))


def _safetensors_bytes(header: dict[str, object], body: bytes) -> bytes:
    """Hand-built safetensors bytes: u64 little-endian header length, JSON header, raw data."""
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


def _reason(payload: TensorPayload, **kwargs: object) -> str:
    with pytest.raises(DecodeError) as info:
        decode_tensors(payload, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        # bit-exact: compare the raw bits, not values with a tolerance
        assert torch.equal(
            got[name].view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8)
        )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_round_trip_is_exact(dtype: torch.dtype) -> None:
    # Given
    tensors = _tensors(dtype)

    # When
    payload = encode_tensors(tensors)
    decoded = decode_tensors(payload)

    # Then
    _assert_identical(decoded, tensors)
    assert payload.nbytes == len(payload.data)
    assert payload.sha256 == hashlib.sha256(payload.data).hexdigest()


def test_round_trip_of_mixed_dtypes_and_non_contiguous_tensors() -> None:
    # Given: a transposed (non-contiguous) tensor and several float dtypes in one payload
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.t(), "h": base.to(torch.float16), "b": base.to(torch.bfloat16)}
    assert not tensors["t"].is_contiguous()

    # When
    decoded = decode_tensors(encode_tensors(tensors))

    # Then
    _assert_identical(decoded, tensors)


def test_encoding_is_deterministic_and_independent_of_insertion_order() -> None:
    tensors = _tensors(torch.float32)
    reversed_order = dict(reversed(list(tensors.items())))
    assert encode_tensors(tensors).data == encode_tensors(reversed_order).data


def test_empty_dict_round_trips() -> None:
    assert decode_tensors(encode_tensors({})) == {}


def test_sha256_hex_matches_hashlib() -> None:
    assert sha256_hex(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_bad_sha256_is_bad_checksum() -> None:
    # Given: a valid payload whose declared sha256 is another (well-formed) digest
    payload = encode_tensors(_tensors(torch.float32))
    wrong = "0" * 64 if payload.sha256 != "0" * 64 else "1" * 64
    tampered = TensorPayload(data=payload.data, sha256=wrong, nbytes=payload.nbytes)

    # Then
    assert _reason(tampered) == "bad_checksum"


def test_flipped_byte_under_the_original_sha_is_bad_checksum() -> None:
    payload = encode_tensors(_tensors(torch.float32))
    data = bytearray(payload.data)
    data[-1] ^= 0x01
    tampered = TensorPayload(data=bytes(data), sha256=payload.sha256, nbytes=payload.nbytes)
    assert _reason(tampered) == "bad_checksum"


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_nbytes_mismatch_is_bad_checksum(delta: int) -> None:
    payload = encode_tensors(_tensors(torch.float32))
    tampered = TensorPayload(data=payload.data, sha256=payload.sha256, nbytes=payload.nbytes + delta)
    assert _reason(tampered) == "bad_checksum"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[: len(d) // 2],  # truncated
        lambda d: d[:8],  # header length only
        lambda d: b"",  # nothing
        lambda d: b"\xff" * 8 + d[8:],  # absurd header length
        lambda d: d[:8] + b"}" + d[9:],  # broken JSON header
        lambda d: d[:-3],  # data shorter than the header's offsets
        lambda d: b"not safetensors at all",
    ],
    ids=["half", "len-only", "empty", "huge-header-len", "bad-json", "short-data", "text"],
)
def test_corrupted_bytes_with_matching_sha_are_bad_tensor(mangle) -> None:  # type: ignore[no-untyped-def]
    # Given: corrupted bytes whose checksum and size are honest, so only loading can catch them
    data = mangle(encode_tensors(_tensors(torch.float32)).data)

    # Then
    assert _reason(_payload(data)) == "bad_tensor"


def test_inconsistent_offsets_are_bad_tensor() -> None:
    # Given: a header claiming 3 float32 values over 8 bytes of data
    data = _safetensors_bytes({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8)
    assert _reason(_payload(data)) == "bad_tensor"


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64], ids=str
)
def test_non_allowed_dtype_is_bad_tensor(dtype: torch.dtype) -> None:
    # Given: an otherwise valid payload with one tensor of a dtype adapters never carry
    assert dtype not in ALLOWED_DTYPES
    tensors = _tensors(torch.float32)
    tensors["sneaky"] = torch.ones(3, dtype=dtype)

    # Then
    with pytest.raises(DecodeError) as info:
        decode_tensors(encode_tensors(tensors))
    assert info.value.reason == "bad_tensor"
    assert "sneaky" in info.value.detail


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values_are_refused_unless_allowed(dtype: torch.dtype, bad: float) -> None:
    # Given: one non-finite element deep inside one tensor
    tensors = _tensors(dtype)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    tensors[key][7, 2] = bad
    payload = encode_tensors(tensors)

    # Then: refused by default
    assert _reason(payload) == "non_finite"

    # When: the caller opts out of the check
    decoded = decode_tensors(payload, check_finite=False)

    # Then: the payload loads unchanged, the bad value included
    _assert_identical(decoded, tensors)
    value = float(decoded[key][7, 2])
    assert (value != value) if bad != bad else value == bad


def test_over_max_bytes_is_too_large_and_the_bound_is_inclusive() -> None:
    payload = encode_tensors(_tensors(torch.float32))
    assert _reason(payload, max_bytes=payload.nbytes - 1) == "too_large"
    _assert_identical(decode_tensors(payload, max_bytes=payload.nbytes), _tensors(torch.float32))


def test_too_large_is_checked_before_the_checksum() -> None:
    # Given: a payload both oversize and with a wrong checksum
    payload = TensorPayload(data=b"\x00" * 2048, sha256="0" * 64, nbytes=2048)
    assert _reason(payload, max_bytes=1024) == "too_large"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_tensors_to_bytes_and_back(dtype: torch.dtype) -> None:
    # Given
    tensors = _tensors(dtype, seed=3)

    # When
    data = tensors_to_bytes(tensors)

    # Then: the same bytes the payload carries, and they load back exactly
    assert isinstance(data, bytes)
    assert data == encode_tensors(tensors).data
    _assert_identical(tensors_from_bytes(data), tensors)


def test_tensors_from_garbage_is_bad_tensor() -> None:
    with pytest.raises(DecodeError) as info:
        tensors_from_bytes(b"\x01\x02\x03garbage")
    assert info.value.reason == "bad_tensor"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=40))
def test_arbitrary_bytes_with_honest_checksum_load_or_raise_decode_error(noise: bytes, cut: int) -> None:
    # Given: random bytes, and a valid payload with random bytes spliced into its header
    valid = encode_tensors({"a": torch.ones(2, 2)}).data
    spliced = valid[: 8 + cut] + noise + valid[8 + cut + len(noise) :]

    for data in (noise, spliced):
        try:
            decoded = decode_tensors(_payload(data))
        except DecodeError as exc:
            assert exc.reason in {"bad_tensor", "non_finite"}
        else:
            assert all(t.dtype in ALLOWED_DTYPES for t in decoded.values())
