"""What the state store keeps of an update once its round is aggregated: a receipt, not its tensors.

A receipt holds what tells a harmless redelivery from a replay with other content (the tensors'
sha256, the sample count, the plan version) and the size the update had, in a few dozen bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from schemas.envelope import decode
from schemas.messages import LoraUpdate

RECEIPT_PREFIX = b"lf-receipt:"


@dataclass(frozen=True)
class Fingerprint:
    sha256: str
    num_samples: int
    plan_version: int


def fingerprint_of(update: LoraUpdate) -> Fingerprint:
    return Fingerprint(update.adapter.sha256, update.num_samples, update.plan_version)


def receipt(update: LoraUpdate, stored_bytes: int) -> bytes:
    """The receipt of ``update``, stored as ``stored_bytes`` bytes until its round was aggregated."""
    fields = {**vars(fingerprint_of(update)), "bytes": stored_bytes}
    return RECEIPT_PREFIX + json.dumps(fields, sort_keys=True).encode()


def fingerprint(stored: bytes) -> Fingerprint:
    """The fingerprint of what the state store holds for a counted update: a receipt or the update."""
    if stored.startswith(RECEIPT_PREFIX):
        fields = json.loads(stored[len(RECEIPT_PREFIX) :])
        return Fingerprint(str(fields["sha256"]), int(fields["num_samples"]), int(fields["plan_version"]))
    message = decode(stored)  # stored only after validation
    assert isinstance(message, LoraUpdate)
    return fingerprint_of(message)
