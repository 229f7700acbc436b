"""``lorafleet data fetch``: download a public data set, check its pinned digest, convert it.

The archive is streamed to a temporary file beside the data directory while its digest is computed;
an archive whose digest is not the pinned one is refused and nothing is written. Conversion reads
the archive's members in memory (nothing is extracted to disk, so member paths cannot escape) and
writes the files the loaders read into a temporary folder, which then replaces ``DIR/NAME``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import defaultdict
from pathlib import Path

from lorafleet.data.sources import SOURCES, Source
from schemas.errors import DataError

_CHUNK = 1 << 20
_SST2_FILES = ("train.tsv", "dev.tsv", "test.tsv")
_NEWS_SPLITS = {"train": "20news-bydate-train", "test": "20news-bydate-test"}


def source_of(name: str) -> Source:
    """The :class:`Source` of data set ``name``.

    Raises:
        DataError: no public source is known for ``name``.
    """
    if name not in SOURCES:
        raise DataError(f"no public source for {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def fetch_dataset(name: str, data_dir: Path, *, url: str | None = None, pin: str | None = None) -> Path:
    """Download data set ``name`` (from ``url``, default its source's), check the archive against
    ``pin`` (``sha256:HEX`` or ``md5:HEX``, default its source's) and write ``data_dir/name``;
    returns that folder.

    Raises:
        DataError: unknown data set or pin, download failed, digest mismatch (nothing written), an
            archive that is not of the expected format.
    """
    source = source_of(name)
    algorithm, expected = _parse_pin(pin or source.pin)
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".{name}-fetch-") as tmp:
        archive = Path(tmp) / "archive"
        got = _download(url or source.url, archive, algorithm)
        if got != expected:
            raise DataError(
                f"{name}: the archive from {url or source.url} has {algorithm} {got}, expected {expected}; "
                "refused (nothing written)"
            )
        staged = Path(tmp) / name
        staged.mkdir()
        if source.archive == "glue_sst2_zip":
            _convert_sst2(archive, staged)
        else:
            _convert_newsgroups(archive, staged)
        target = data_dir / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def _parse_pin(pin: str) -> tuple[str, str]:
    algorithm, _, digest = pin.partition(":")
    if algorithm not in ("sha256", "md5") or not digest:
        raise DataError(f"checksum {pin!r}: expected sha256:HEX or md5:HEX")
    return algorithm, digest.lower()


def _download(url: str, path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, path.open("wb") as out:  # noqa: S310
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DataError(f"download of {url} failed: {exc}") from None
    return digest.hexdigest()


def _convert_sst2(archive: Path, out: Path) -> None:
    """GLUE's SST-2.zip: ``SST-2/{train,dev,test}.tsv`` copied byte for byte."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in _SST2_FILES:
                (out / name).write_bytes(zf.read(f"SST-2/{name}"))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"sst2: not GLUE's SST-2.zip ({exc})") from None


def _convert_newsgroups(archive: Path, out: Path) -> None:
    """20news-bydate.tar.gz: one JSON line per message (``id``, ``label``, ``label_name``, ``text``
    decoded as latin-1), ordered by group then numeric file name, gzip with mtime 0; ``classes.txt``
    the groups in label (alphabetical) order."""
    splits: dict[str, dict[str, dict[str, bytes]]] = {s: defaultdict(dict) for s in _NEWS_SPLITS}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if not member.isfile() or len(parts) != 3 or parts[2].startswith("."):
                    continue
                split = next((s for s, folder in _NEWS_SPLITS.items() if folder == parts[0]), None)
                handle = tar.extractfile(member)
                if split is not None and handle is not None:
                    splits[split][parts[1]][parts[2]] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"20newsgroups: not the 20news-bydate tarball ({exc})") from None
    groups = sorted(set(splits["train"]) | set(splits["test"]))
    if not groups or not all(splits.values()):
        raise DataError(
            "20newsgroups: the archive has no 20news-bydate-train/ and 20news-bydate-test/ messages"
        )
    for split, by_group in splits.items():
        _write_jsonl_gz(out / f"{split}.jsonl.gz", by_group, groups)
    (out / "classes.txt").write_text("".join(f"{g}\n" for g in groups), encoding="utf-8")


def _write_jsonl_gz(path: Path, by_group: dict[str, dict[str, bytes]], groups: list[str]) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
        for label, group in enumerate(groups):
            files = by_group.get(group, {})
            for file in sorted(files, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f)):
                row = {"id": f"{group}/{file}", "label": label, "label_name": group}
                row["text"] = files[file].decode("latin-1")
                gz.write((json.dumps(row) + "\n").encode("utf-8"))
    path.write_bytes(buffer.getvalue())
