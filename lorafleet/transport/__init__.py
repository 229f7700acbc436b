"""The Transport port and its adapters. Only :mod:`lorafleet.transport.rabbitmq` imports pika."""

from lorafleet.transport.base import (
    AccessRefused,
    Delivery,
    ExchangeNotFound,
    ExchangeSpec,
    QueueNotFound,
    QueueSpec,
    Subscription,
    Transport,
    TransportClosed,
    TransportError,
    Unroutable,
    dead_letter_reason,
)
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport

__all__ = [
    "AccessRefused",
    "Delivery",
    "ExchangeNotFound",
    "ExchangeSpec",
    "InMemoryBroker",
    "InMemoryTransport",
    "QueueNotFound",
    "QueueSpec",
    "Subscription",
    "Transport",
    "TransportClosed",
    "TransportError",
    "Unroutable",
    "dead_letter_reason",
]
