"""Datasets, IID partitioning, data directory resolution and batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.data.datasets import (
    DataError,
    EncodedDataset,
    iter_batches,
    load_split,
    num_labels,
    partition_iid,
    resolve_data_dir,
    synthetic_rows,
)


def _shared_data() -> Path | None:
    try:
        return resolve_data_dir(None)
    except DataError:
        return None


SHARED = _shared_data()


def test_partition_iid_shards_are_disjoint_and_sized() -> None:
    shards = partition_iid(100, 4, 20, seed=3)
    assert [len(s) for s in shards] == [20] * 4
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 80 and all(0 <= i < 100 for i in flat)


def test_partition_iid_splits_everything_evenly_without_per_device() -> None:
    shards = partition_iid(10, 3, None, seed=0)
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    assert sorted(i for s in shards for i in s) == list(range(10))


def test_partition_iid_is_seeded() -> None:
    assert partition_iid(50, 5, 10, seed=1) == partition_iid(50, 5, 10, seed=1)
    assert partition_iid(50, 5, 10, seed=1) != partition_iid(50, 5, 10, seed=2)


@pytest.mark.parametrize(("n", "devices", "per"), [(10, 3, 4), (2, 3, None), (10, 0, 1)])
def test_partition_iid_refuses_too_few_items(n: int, devices: int, per: int | None) -> None:
    with pytest.raises(ValueError):
        partition_iid(n, devices, per, seed=0)


def test_synthetic_dataset_is_deterministic_and_balanced() -> None:
    train = load_split("synthetic", None, "train")
    assert len(train) == 4000 and len(load_split("synthetic", None, "eval")) == 400
    assert train.num_labels == 2 == num_labels("synthetic")
    assert 1700 < sum(train.labels) < 2300
    assert synthetic_rows(20, seed=7) == synthetic_rows(20, seed=7)
    assert train.texts[:50] != load_split("synthetic", None, "eval").texts[:50]


def test_missing_data_dir_says_how_to_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        resolve_data_dir(str(missing))
    assert str(missing) in str(err.value)
    assert "data.data_dir" in str(err.value) and "LORAFLEET_DATA_DIR" in str(err.value)


def test_missing_dataset_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        load_split("sst2", None, "train")
    assert str(tmp_path / "sst2" / "train.tsv") in str(err.value)


def test_unknown_dataset_is_refused() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        num_labels("mnist")


def test_iter_batches_pads_dynamically_and_shuffles_by_seed() -> None:
    encoded = EncodedDataset([[101, 5, 102], [101, 102], [101, 7, 8, 9, 102]], [0, 1, 1], pad_token_id=0)
    first = next(iter_batches(encoded, 2, seed=None))
    assert first["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert first["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert first["labels"].tolist() == [0, 1]
    orders = [[b["labels"].tolist() for b in iter_batches(encoded, 1, seed=s)] for s in (1, 1)]
    assert orders[0] == orders[1]
    assert sum(len(b["labels"]) for b in iter_batches(encoded, 2, seed=4)) == 3


@pytest.mark.skipif(SHARED is None or not (SHARED / "sst2").is_dir(), reason="shared SST-2 data not present")
def test_sst2_counts() -> None:
    train, dev = load_split("sst2", SHARED, "train"), load_split("sst2", SHARED, "eval")
    assert (len(train), len(dev)) == (67349, 872)
    assert sum(dev.labels) == 444 and not dev.texts[0].endswith(" ")


@pytest.mark.skipif(
    SHARED is None or not (SHARED / "20newsgroups").is_dir(), reason="shared 20NG data not present"
)
def test_20newsgroups_counts() -> None:
    train, test = load_split("20newsgroups", SHARED, "train"), load_split("20newsgroups", SHARED, "eval")
    assert (len(train), len(test)) == (11314, 7532)
    assert train.num_labels == 20 and set(train.labels) == set(range(20))
