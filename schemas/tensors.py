"""Tensor codec: adapter tensors travel as safetensors bytes plus their sha256.

Pure functions over bytes, no file I/O. Only floating-point tensors are accepted (LoRA factors and
the classification head); anything else is refused with :class:`schemas.errors.DecodeError`.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from schemas.errors import DecodeError
from schemas.messages import TensorPayload

#: dtypes an adapter payload may carry.
ALLOWED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})

#: Default bound on one payload; services pass their own setting.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def encode_tensors(tensors: dict[str, torch.Tensor]) -> TensorPayload:
    """Serialise ``tensors`` (moved to CPU, made contiguous) into a checksummed payload."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in sorted(tensors.items())}
    data = _st_save(flat)
    return TensorPayload(data=data, sha256=sha256_hex(data), nbytes=len(data))


def decode_tensors(
    payload: TensorPayload, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, check_finite: bool = True
) -> dict[str, torch.Tensor]:
    """Verify and load a payload.

    Raises:
        DecodeError: ``too_large`` over ``max_bytes``; ``bad_checksum`` when the sha256 or the
            declared size does not match; ``bad_tensor`` when safetensors cannot load the bytes or a
            dtype is not allowed; ``non_finite`` when a tensor holds NaN or Inf.
    """
    data = payload.data
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"tensor payload of {len(data)} bytes exceeds {max_bytes}")
    if len(data) != payload.nbytes or sha256_hex(data) != payload.sha256:
        raise DecodeError("bad_checksum", "tensor payload does not match its sha256/size")
    try:
        tensors = _st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DecodeError("bad_tensor", f"safetensors could not load the payload: {exc}") from None
    for name, tensor in tensors.items():
        if tensor.dtype not in ALLOWED_DTYPES:
            raise DecodeError("bad_tensor", f"tensor {name!r} has dtype {tensor.dtype}, not a float type")
        if check_finite and not bool(torch.isfinite(tensor).all()):
            raise DecodeError("non_finite", f"tensor {name!r} holds NaN or Inf")
    return tensors


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of ``tensors`` (for state that is stored, not sent)."""
    return bytes(encode_tensors(tensors).data)


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Load safetensors bytes written by :func:`tensors_to_bytes`.

    Raises:
        DecodeError: ``bad_tensor`` if the bytes do not load.
    """
    try:
        return _st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DecodeError("bad_tensor", f"stored tensors do not load: {exc}") from None
