"""lorafleet: federated LoRA fine-tuning across heterogeneous edge devices.

The shared runtime: the Transport and StateStore ports with their adapters, topology and keys,
model and data helpers, the embedded runner and the ``lorafleet`` CLI.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorafleet")  # the installed package's metadata: pyproject.toml's version
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
