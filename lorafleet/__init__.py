"""lorafleet: federated LoRA fine-tuning across heterogeneous edge devices.

The shared runtime: the Transport and StateStore ports with their adapters, topology and keys,
model and data helpers, the embedded runner and the ``lorafleet`` CLI.
"""

__version__ = "0.1.0"
