"""``lorafleet data fetch`` against a local HTTP server: small archives of the real formats are
downloaded, checked against the expected checksum, converted to the layout the loaders read; a
corrupted archive is refused and leaves nothing behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafleet.app.cli import app
from lorafleet.data.datasets import load_split, resolve_data_dir
from lorafleet.data.fetch import fetch_dataset
from lorafleet.data.sources import SOURCES
from schemas.errors import DataError

SST2 = {
    "train.tsv": b"sentence\tlabel\nhide new secretions from the parental units \t0\na gorgeous film \t1\n",
    "dev.tsv": b"sentence\tlabel\nit 's a charming and often affecting journey . \t1\n",
    "test.tsv": b"index\tsentence\n0\tuneasy mishmash of styles and genres .\n",
}
NEWS = {
    "20news-bydate-train/sci.space/38": b"Subject: orbit\n\nLaunch windows.",
    "20news-bydate-train/sci.space/9": b"Subject: moon\n\nCaf\xe9 on the moon.",  # latin-1
    "20news-bydate-train/alt.atheism/51060": b"Subject: faq\n\nResources.",
    "20news-bydate-test/alt.atheism/53068": b"Subject: re: faq\n\nThanks.",
    "20news-bydate-test/sci.space/61": b"Subject: shuttle\n\nTiles.",
    "20news-bydate-test/sci.space/.DS_Store": b"\x00\x01",
}


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  # the stdlib's name
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder, its URL): a local HTTP server over a folder, in a thread."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _sst2_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in SST2.items():
            zf.writestr(f"SST-2/{name}", data)
    return buffer.getvalue()


def _news_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in NEWS.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_sst2_is_downloaded_checked_and_laid_out_as_the_loaders_read_it(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    www, url = served
    archive = _sst2_zip()
    (www / "SST-2.zip").write_bytes(archive)
    out = fetch_dataset("sst2", tmp_path / "data", url=f"{url}/SST-2.zip", pin=_sha256(archive))
    assert out == tmp_path / "data" / "sst2"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == SST2
    train = load_split("sst2", tmp_path / "data", "train")
    assert train.texts == ["hide new secretions from the parental units", "a gorgeous film"]
    assert train.labels == [0, 1]
    assert load_split("sst2", tmp_path / "data", "eval").labels == [1]


def test_a_corrupted_archive_is_refused_and_nothing_is_written(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    www, url = served
    archive = _sst2_zip()
    corrupted = archive[:100] + bytes([archive[100] ^ 0xFF]) + archive[101:]
    (www / "SST-2.zip").write_bytes(corrupted)
    with pytest.raises(DataError, match="refused") as refused:
        fetch_dataset("sst2", tmp_path / "data", url=f"{url}/SST-2.zip", pin=_sha256(archive))
    assert hashlib.sha256(corrupted).hexdigest() in str(refused.value)
    assert list((tmp_path / "data").iterdir()) == []  # no sst2/, no temporary folder left


def test_20newsgroups_becomes_json_lines_in_label_and_file_order(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    www, url = served
    archive = _news_tar()
    (www / "20news-bydate.tar.gz").write_bytes(archive)
    out = fetch_dataset(
        "20newsgroups", tmp_path / "data", url=f"{url}/20news-bydate.tar.gz", pin=_sha256(archive)
    )
    assert (out / "classes.txt").read_text() == "alt.atheism\nsci.space\n"
    with gzip.open(out / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == ["alt.atheism/51060", "sci.space/9", "sci.space/38"]  # numeric order
    assert list(rows[0]) == ["id", "label", "label_name", "text"]  # the shared data's field order
    assert rows[1] == {
        "id": "sci.space/9",
        "label": 1,
        "label_name": "sci.space",
        "text": "Subject: moon\n\nCafé on the moon.",
    }
    test = load_split("20newsgroups", tmp_path / "data", "eval")
    assert test.labels == [0, 1] and len(test.texts) == 2  # .DS_Store skipped
    first = (out / "train.jsonl.gz").read_bytes()
    fetch_dataset("20newsgroups", tmp_path / "data", url=f"{url}/20news-bydate.tar.gz", pin=_sha256(archive))
    assert (out / "train.jsonl.gz").read_bytes() == first  # gzip mtime 0: the same bytes every time


def test_the_command_takes_a_mirror_and_its_checksum_and_refuses_a_wrong_one(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    www, url = served
    archive = _sst2_zip()
    (www / "SST-2.zip").write_bytes(archive)
    args = ["data", "fetch", "sst2", "--url", f"{url}/SST-2.zip", "--dir", str(tmp_path / "data")]
    ok = CliRunner().invoke(app, [*args, "--sha256", hashlib.sha256(archive).hexdigest()])
    assert ok.exit_code == 0, ok.output
    assert "dev.tsv, test.tsv, train.tsv" in ok.stdout
    wrong = CliRunner().invoke(app, [*args, "--sha256", "0" * 64])
    assert isinstance(wrong.exception, DataError) and "refused" in str(wrong.exception)


def test_the_real_sources_pin_a_digest_of_the_right_length() -> None:
    lengths = {"sha256": 64, "md5": 32}
    for source in SOURCES.values():
        algorithm, _, digest = source.pin.partition(":")
        assert len(digest) == lengths[algorithm] and int(digest, 16) >= 0
        assert source.url.startswith(("https://", "http://")) and source.license and source.cite
    assert set(SOURCES) == {"sst2", "20newsgroups"}


def test_a_missing_data_directory_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"lorafleet data fetch 20newsgroups --dir DIR") as missing:
        resolve_data_dir(str(tmp_path / "absent"), dataset="20newsgroups")
    assert "\n" not in str(missing.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"sst2/train.tsv.*lorafleet data fetch sst2 --dir DIR"):
        resolve_data_dir(str(tmp_path / "empty"), dataset="sst2")
