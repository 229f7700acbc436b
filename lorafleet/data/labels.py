"""The class names of a run's labels, in label order, as the exported adapter records them."""

from __future__ import annotations

from schemas.config import RunConfig

#: SST-2's labels (GLUE: 0 negative, 1 positive); the synthetic rows are sentiment rows too.
SENTIMENT = ["negative", "positive"]

#: The 20 Newsgroups groups in label order (alphabetical, ``classes.txt`` and scikit-learn's order).
NEWSGROUPS = [
    "alt.atheism",
    "comp.graphics",
    "comp.os.ms-windows.misc",
    "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware",
    "comp.windows.x",
    "misc.forsale",
    "rec.autos",
    "rec.motorcycles",
    "rec.sport.baseball",
    "rec.sport.hockey",
    "sci.crypt",
    "sci.electronics",
    "sci.med",
    "sci.space",
    "soc.religion.christian",
    "talk.politics.guns",
    "talk.politics.mideast",
    "talk.politics.misc",
    "talk.religion.misc",
]

_BUILT_IN = {"sst2": SENTIMENT, "synthetic": SENTIMENT, "20newsgroups": NEWSGROUPS}


def label_names(config: RunConfig) -> list[str] | None:
    """``data.labels`` when set, else the named dataset's class names; None for instruction tuning
    (``model.task: causal_lm``) and for a ``jsonl`` file without ``data.labels``."""
    if config.model.task != "sequence_classification":
        return None
    if config.data.labels is not None:
        return list(config.data.labels)
    names = _BUILT_IN.get(config.data.dataset)
    return None if names is None else list(names)
