"""What one update tells about its device's capacity, handed from the aggregator to the orchestrator.

The aggregator stores one :class:`DeviceMeasurement` per device in each aggregated round's metrics
(the state store, so it survives restarts and lands in ``report.json``); the orchestrator folds them
into its capacity estimates (orchestrator/capacity.py).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from schemas.messages import LoraUpdate, Seconds, StrictModel

Count = Annotated[int, Field(ge=0)]


class DeviceMeasurement(StrictModel):
    device_compute_s: Seconds  # the device's compute time for the task
    tokens: Count  # padded tokens through the gradient path
    embed_tokens: Count  # tokens through the embeddings
    prefix_block_tokens: Count  # sum over frozen prefix blocks of tokens through them
    steps: Count
    examples: Count
    lowest_block: Count  # the lowest LoRA block (where backward stops)
    bytes_down: Count
    downlink_s: Seconds
    bytes_up: Count
    uplink_s: Seconds
    device_time_s: Seconds  # download, compute and upload: the task's time on the device

    @classmethod
    def of(cls, update: LoraUpdate) -> DeviceMeasurement:
        m = update.metrics
        return cls(
            device_compute_s=m.device_compute_s,
            tokens=m.tokens,
            embed_tokens=m.embed_tokens,
            prefix_block_tokens=m.prefix_block_tokens,
            steps=m.steps,
            examples=m.examples,
            lowest_block=m.lowest_block,
            bytes_down=m.bytes_down,
            downlink_s=m.downlink_s,
            bytes_up=m.bytes_up,
            uplink_s=m.uplink_s,
            device_time_s=m.device_time_s,
        )

    @classmethod
    def from_stored(cls, data: object) -> DeviceMeasurement:
        """Read one back from the state store (JSON numbers: an integral float may come back an int)."""
        return cls.model_validate(data, strict=False)
