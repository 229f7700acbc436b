"""What the service zygote (:mod:`lorafleet.app.zygote`) imports before it forks any service.

Everything a service imports at start (torch, transformers with the default BERT family, peft,
datasets, every lorafleet service module), so that a forked service shares those pages instead of
importing them again. Then ``gc.freeze``: the collector leaves these objects alone, so it does not
write to (and copy) their pages in every service.
"""

from __future__ import annotations

import gc

import datasets  # noqa: F401
import transformers.models.bert.modeling_bert  # noqa: F401

import lorafleet.app.cli  # noqa: F401
import lorafleet.app.wiring  # noqa: F401

gc.collect()
gc.freeze()
