"""A device's labelled rows from a local file (lorafleet/data/device_rows.py): every format the worker
reads, labels by name or index, text pairs, the configuration's rules, and every error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.data.datasets import TextDataset, encode_dataset, eval_set, load_device_train, load_train
from lorafleet.data.device_rows import RowSpec, file_format, read_configured, read_rows
from schemas.config import RunConfig, parse_run_config
from schemas.errors import ConfigError, DataError

LABELS = ("negative", "positive")
SPEC = RowSpec("text", "label", LABELS)
ROWS: list[dict[str, Any]] = [
    {"text": "a fine film", "label": "positive"},
    {"text": "dull, and too long", "label": 0},
    {"text": 'the "best" score', "label": 1},
    {"text": "awful", "label": "negative"},
]
EXPECTED_TEXTS = [r["text"] for r in ROWS]
EXPECTED_LABELS = [1, 0, 1, 0]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(**data: Any) -> RunConfig:
    return parse_run_config({"model": {"name": "tiny"}, "data": {"dataset": "synthetic", **data}})


# --------------------------------------------------------------------------- formats


def test_jsonl_labels_by_name_and_index(tmp_path: Path) -> None:
    ds = read_rows(_jsonl(tmp_path / "rows.jsonl", ROWS), SPEC, name="synthetic")
    assert ds.texts == EXPECTED_TEXTS
    assert ds.labels == EXPECTED_LABELS
    assert (ds.num_labels, ds.name, ds.pairs) == (2, "synthetic", None)


def test_csv_quoted_commas(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(
        'text,label\na fine film,positive\n"dull, and too long",0\n"the ""best"" score",1\nawful,negative\n',
        encoding="utf-8",
    )
    ds = read_rows(path, SPEC, name="synthetic")
    assert ds.texts == EXPECTED_TEXTS
    assert ds.labels == EXPECTED_LABELS


def test_tsv_without_quoting_like_sst2(tmp_path: Path) -> None:
    # SST-2's files: a header sentence<TAB>label, sentences with bare " characters
    path = tmp_path / "rows.tsv"
    path.write_text('sentence\tlabel\nit \'s "great"\t1\nno , thanks\t0\n', encoding="utf-8")
    ds = read_rows(path, RowSpec("sentence", "label", LABELS), name="sst2")
    assert ds.texts == ['it \'s "great"', "no , thanks"]
    assert ds.labels == [1, 0]


def test_parquet_and_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    table = datasets.Dataset.from_dict(
        {"text": EXPECTED_TEXTS, "label": ["positive", "negative", "positive", "negative"]}
    )
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    for path in (tmp_path / "rows.parquet", tmp_path / "saved", tmp_path / "saved_dict"):
        ds = read_rows(path, SPEC, name="synthetic")
        assert ds.texts == EXPECTED_TEXTS, path
        assert ds.labels == EXPECTED_LABELS, path


def test_compressed_jsonl(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    assert read_rows(path, SPEC, name="synthetic").labels == EXPECTED_LABELS


def test_text_pairs_are_read_and_tokenised_as_pairs(tmp_path: Path) -> None:
    rows = [{"q": "is it good", "a": "yes it is", "y": 1}, {"q": "is it bad", "a": "no", "y": 0}]
    spec = RowSpec("q", "y", LABELS, text_pair_field="a")
    ds = read_rows(_jsonl(tmp_path / "pairs.jsonl", rows), spec, name="synthetic")
    assert ds.pairs == ["yes it is", "no"]
    assert ds.subset([1]).pairs == ["no"]

    class Tokenizer:  # records what encode_dataset asks for
        pad_token_id = 0

        def __call__(self, texts: list[str], **kw: Any) -> dict[str, list[list[int]]]:
            self.kw = kw
            return {
                "input_ids": [[1] * (len(t) + len(p)) for t, p in zip(texts, kw["text_pair"], strict=True)]
            }

    tok = Tokenizer()
    encoded = encode_dataset(tok, ds, 32)  # type: ignore[arg-type]
    assert tok.kw["text_pair"] == ["yes it is", "no"]
    assert [len(x) for x in encoded.input_ids] == [len("is it good") + 9, len("is it bad") + 2]


def test_file_format_by_suffix() -> None:
    assert file_format(Path("a.JSONL"))[0] == "json"
    assert file_format(Path("a.tsv.gz")) == ("csv", {"sep": "\t", "quoting": 3})
    with pytest.raises(DataError, match=r"^a\.txt: unknown file format"):
        file_format(Path("a.txt"))


# --------------------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match=rf"^{path}: no such file or folder$"):
        read_rows(path, SPEC, name="synthetic")


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "text,label\n"), ("empty.parquet", "")],
)
def test_empty_files(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: .*no rows"):
        read_rows(path, SPEC, name="synthetic")


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", [{"sentence": "x", "label": 1}])
    with pytest.raises(DataError, match=rf"^{path}: no column 'text' \(columns: \['label', 'sentence'\]\)"):
        read_rows(path, SPEC, name="synthetic")
    pair = RowSpec("sentence", "label", LABELS, text_pair_field="other")
    with pytest.raises(DataError, match="no column 'other'"):
        read_rows(path, pair, name="synthetic")


@pytest.mark.parametrize("label", ["neutral", 2, -1, 1.5, True])
def test_label_outside_the_configured_names(tmp_path: Path, label: Any) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", [{"text": "ok", "label": 1}, {"text": "x", "label": label}])
    with pytest.raises(DataError, match=rf"^{path}: row 2: label .* is not in data.labels"):
        read_rows(path, SPEC, name="synthetic")


def test_missing_label_and_non_text(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", [{"text": "ok", "label": 1}, {"text": "x"}])
    with pytest.raises(DataError, match=rf"^{path}: row 2: no label$"):
        read_rows(path, SPEC, name="synthetic")
    path = _jsonl(tmp_path / "num.jsonl", [{"text": 5, "label": 1}])
    with pytest.raises(DataError, match=rf"^{path}: row 1: column 'text' must hold text, got int 5"):
        read_rows(path, SPEC, name="synthetic")


def test_unparseable_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: cannot read it as json: "):
        read_rows(path, SPEC, name="synthetic")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match=rf"^{folder}: not a folder that datasets' save_to_disk wrote"):
        read_rows(folder, SPEC, name="synthetic")


# --------------------------------------------------------------------------- the configuration


def test_configuration_rules() -> None:
    cfg = _config(source="local", labels=list(LABELS), text_field="sentence")
    assert (cfg.data.source, cfg.data.text_field, cfg.data.label_field) == ("local", "sentence", "label")
    assert _config().data.source == "partition"
    with pytest.raises(ConfigError, match="data.source local needs data.labels"):
        _config(source="local")
    with pytest.raises(ConfigError, match="data.path is the central file of data.source partition"):
        _config(source="local", labels=list(LABELS), path="rows.jsonl")
    with pytest.raises(ConfigError, match="files of labelled rows with data.labels"):
        _config(path="rows.jsonl")
    with pytest.raises(ConfigError, match="names a class twice"):
        _config(labels=["a", "a"])


def test_label_count_must_match_the_dataset(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = _config(source="local", labels=["a", "b", "c"])
    with pytest.raises(DataError, match=r"data.labels names 3 classes .* data.dataset synthetic has 2"):
        read_configured(path, cfg.data)


def test_local_and_central_files_through_the_loaders(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", ROWS)
    local = load_device_train(_config(source="local", labels=list(LABELS)), path)
    assert isinstance(local, TextDataset) and local.labels == EXPECTED_LABELS
    central = _config(labels=list(LABELS), path=str(path), eval_path=str(path))
    assert load_train(central).texts == EXPECTED_TEXTS
    assert eval_set(central).labels == EXPECTED_LABELS
