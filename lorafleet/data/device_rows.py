"""Labelled rows from a local file: a device's own training rows (``data.source: local``,
``lorafleet worker --data``) or a central file (``data.path``/``data.eval_path``).

The file is read with the ``datasets`` library: JSON lines (``.jsonl``, ``.json``), CSV (``.csv``),
TSV (``.tsv``, no quoting), Parquet (``.parquet``), each optionally compressed (``.gz``, ``.bz2``,
``.xz``, ``.zst``), or a folder that ``datasets.Dataset.save_to_disk`` wrote (a ``DatasetDict``'s
``train`` split). Its cache lives in a temporary folder that is removed afterwards, so no copy of the
rows stays behind. Columns and labels come from the run configuration (:class:`RowSpec`): a label is
a name in ``data.labels`` or its index there, so every device maps its labels alike.

Every problem is a :class:`~schemas.errors.DataError` whose message starts with the file's path: it
is missing, empty, unreadable, lacks a column, or a row's label is not one of ``data.labels``.
"""

from __future__ import annotations

import csv
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.data.datasets import TextDataset, num_labels
from schemas.config import DataConfig
from schemas.errors import DataError

#: The ``datasets`` builder (and its options) of each file suffix.
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE}),
    ".parquet": ("parquet", {}),
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


@dataclass(frozen=True)
class RowSpec:
    """Where a file keeps the text (and the optional second text) and the label, and the label names."""

    text_field: str
    label_field: str
    labels: tuple[str, ...]
    text_pair_field: str | None = None

    @classmethod
    def of(cls, data: DataConfig) -> RowSpec:
        """The spec of ``data`` (``data.labels`` must be set: the configuration requires it for files)."""
        if data.labels is None:
            raise DataError("labelled rows from a file need data.labels, the class names in order")
        return cls(data.text_field, data.label_field, tuple(data.labels), data.text_pair_field)


def file_format(path: Path) -> tuple[str, dict[str, Any]]:
    """The ``datasets`` builder and options for ``path`` by its suffix (after a compression suffix).

    Raises:
        DataError: an unknown suffix.
    """
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    if suffixes and suffixes[-1] in FORMATS:
        return FORMATS[suffixes[-1]]
    known = ", ".join(FORMATS)
    raise DataError(
        f"{path}: unknown file format (use {known}, optionally compressed, or a save_to_disk folder)"
    )


def read_rows(path: str | Path, spec: RowSpec, *, name: str) -> TextDataset:
    """The labelled rows of ``path`` as a :class:`TextDataset` named ``name`` with ``len(spec.labels)``
    classes (``pairs`` set when ``spec.text_pair_field`` is).

    Raises:
        DataError: as the module docstring says; the message starts with ``path``.
    """
    path = Path(path)
    columns = _read_columns(path)
    wanted = [spec.text_field, spec.label_field]
    if spec.text_pair_field is not None:
        wanted.append(spec.text_pair_field)
    for column in wanted:
        if column not in columns:
            raise DataError(
                f"{path}: no column {column!r} (columns: {sorted(columns)}); the run configuration names "
                "it in data.text_field, data.label_field or data.text_pair_field"
            )
    count = len(columns[spec.text_field])
    if count == 0:
        raise DataError(f"{path}: no rows")
    texts = _texts(path, columns[spec.text_field], spec.text_field)
    pairs = None
    if spec.text_pair_field is not None:
        pairs = _texts(path, columns[spec.text_pair_field], spec.text_pair_field)
    index = {label: i for i, label in enumerate(spec.labels)}
    labels = [
        _label(path, row, value, spec.labels, index)
        for row, value in enumerate(columns[spec.label_field], start=1)
    ]
    return TextDataset(texts, labels, len(spec.labels), name, pairs=pairs)


def read_configured(path: str | Path, data: DataConfig) -> TextDataset:
    """The labelled rows of ``path`` under ``data`` (its columns and labels), checked to name as many
    classes as ``data.dataset`` has.

    Raises:
        DataError: as :func:`read_rows`, or ``data.labels`` is not as long as the dataset's classes.
    """
    spec = RowSpec.of(data)
    expected = num_labels(data.dataset)
    if len(spec.labels) != expected:
        raise DataError(
            f"data.labels names {len(spec.labels)} classes ({list(spec.labels)}); data.dataset "
            f"{data.dataset} has {expected}"
        )
    return read_rows(path, spec, name=data.dataset)


# --------------------------------------------------------------------------- reading


def _read_columns(path: Path) -> dict[str, list[Any]]:
    if path.is_dir():
        return _from_disk(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    builder, options = file_format(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (no rows)")
    import datasets  # imports pyarrow and pandas: only where files are read

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as one DataError
    with tempfile.TemporaryDirectory(prefix="lorafleet-rows-") as cache:
        try:
            ds = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, **options
            )
        except Exception as exc:  # the builders raise many kinds (pyarrow, pandas, json): one message
            if "corresponds to no data" in str(exc):  # a header or blank lines only
                raise DataError(f"{path}: no rows") from None
            raise DataError(f"{path}: cannot read it as {builder}: {_reason(exc)}") from None
        return {column: list(ds[column]) for column in ds.column_names}


def _from_disk(path: Path) -> dict[str, list[Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a folder that datasets' save_to_disk wrote: {_reason(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: a DatasetDict without a train split (splits: {sorted(loaded)})")
        loaded = loaded["train"]
    return {column: list(loaded[column]) for column in loaded.column_names}


def _reason(exc: BaseException) -> str:
    cause: BaseException = exc
    while cause.__cause__ is not None:  # the builders wrap the parser's error
        cause = cause.__cause__
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _texts(path: Path, values: list[Any], column: str) -> list[str]:
    for row, value in enumerate(values, start=1):
        if not isinstance(value, str):
            got = "nothing" if _missing(value) else f"{type(value).__name__} {value!r}"
            raise DataError(f"{path}: row {row}: column {column!r} must hold text, got {got}")
    return list(values)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _label(path: Path, row: int, value: Any, names: tuple[str, ...], index: dict[str, int]) -> int:
    """The class index of a label given by name or by index."""
    if isinstance(value, str):
        key = value.strip()
        if key in index:
            return index[key]
        position: int | None = int(key) if key.isdigit() else None
    elif isinstance(value, int) and not isinstance(value, bool):
        position = value
    elif isinstance(value, float) and value.is_integer():
        position = int(value)
    elif _missing(value):
        raise DataError(f"{path}: row {row}: no label")
    else:
        position = None
    if position is None or not 0 <= position < len(names):
        raise DataError(
            f"{path}: row {row}: label {value!r} is not in data.labels {list(names)} "
            f"(give a name, or an index 0..{len(names) - 1})"
        )
    return position
