"""Pure helpers over adapter tensor dicts: key parsing, spec selection, shapes and sizes."""

from __future__ import annotations

import pytest
import torch

from lorafleet.ml.lora import KeyInfo, blocks_of, key_rank, nbytes, parse_key, select_for_spec, shapes
from schemas.messages import LoraSpec

D_IN, D_OUT, RANK, BLOCKS = 6, 5, 8, 4
MODULES = ("query", "value")
HEAD_W = "base_model.model.classifier.weight"
HEAD_B = "base_model.model.classifier.bias"


def key(block: int, module: str, factor: str) -> str:
    return f"base_model.model.bert.encoder.layer.{block}.attention.self.{module}.lora_{factor}.weight"


def global_adapter(rank: int = RANK, blocks: int = BLOCKS) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {HEAD_W: torch.randn(3, D_IN, generator=gen), HEAD_B: torch.randn(3, generator=gen)}
    for b in range(blocks):
        for m in MODULES:
            out[key(b, m, "A")] = torch.randn(rank, D_IN, generator=gen)
            out[key(b, m, "B")] = torch.randn(D_OUT, rank, generator=gen)
    return out


def spec(ranks: dict[int, int], modules: tuple[str, ...] = MODULES) -> LoraSpec:
    return LoraSpec(target_modules=list(modules), layer_ranks=ranks)


# ---- parse_key -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "want", "axis"),
    [
        (key(0, "query", "A"), KeyInfo(0, "query", "A"), 0),
        (key(5, "value", "B"), KeyInfo(5, "value", "B"), 1),
        (key(11, "query", "B"), KeyInfo(11, "query", "B"), 1),
        ("base_model.model.bert.encoder.layer.3.output.dense.lora_A.weight", KeyInfo(3, "dense", "A"), 0),
        (
            "base_model.model.bert.encoder.layer.7.attention.output.dense.lora_B.weight",
            KeyInfo(7, "dense", "B"),
            1,
        ),
        ("base_model.model.encoder.layer.2.key.lora_A.weight", KeyInfo(2, "key", "A"), 0),  # no middle path
        (HEAD_W, KeyInfo(None, None, None), None),
        (HEAD_B, KeyInfo(None, None, None), None),
        ("base_model.model.bert.pooler.dense.weight", KeyInfo(None, None, None), None),
        (
            "base_model.model.bert.encoder.layer.2.attention.self.query.weight",
            KeyInfo(None, None, None),
            None,
        ),
        (
            "base_model.model.bert.encoder.layer.2.attention.self.query.lora_A.bias",
            KeyInfo(None, None, None),
            None,
        ),
        (
            "base_model.model.bert.encoder.layer.2.attention.self.query.lora_C.weight",
            KeyInfo(None, None, None),
            None,
        ),
    ],
)
def test_parse_key(k: str, want: KeyInfo, axis: int | None) -> None:
    info = parse_key(k)
    assert info == want
    assert info.rank_axis == axis


def test_key_rank() -> None:
    tensors = global_adapter(rank=5)
    assert key_rank(key(1, "query", "A"), tensors[key(1, "query", "A")]) == 5
    assert key_rank(key(1, "query", "B"), tensors[key(1, "query", "B")]) == 5
    assert key_rank(HEAD_W, tensors[HEAD_W]) is None


# ---- select_for_spec -----------------------------------------------------------------------------


def test_full_spec_selects_everything_unchanged() -> None:
    tensors = global_adapter()
    out = select_for_spec(tensors, spec(dict.fromkeys(range(BLOCKS), RANK)))
    assert set(out) == set(tensors)
    for k in tensors:
        assert torch.equal(out[k], tensors[k])


@pytest.mark.parametrize(
    ("ranks", "modules"),
    [
        ({0: 2}, ("query",)),
        ({1: 4, 3: 8}, ("query", "value")),
        ({0: 1, 1: 3, 2: 5, 3: 7}, ("value",)),
        ({2: 8}, ("value", "query")),
    ],
)
def test_select_keeps_head_and_only_spec_blocks_and_modules_truncated(
    ranks: dict[int, int], modules: tuple[str, ...]
) -> None:
    # Given
    tensors = global_adapter()

    # When
    out = select_for_spec(tensors, spec(ranks, modules))

    # Then: exactly the head plus A/B of the spec's (block, module) pairs
    want_keys = {HEAD_W, HEAD_B} | {key(b, m, f) for b in ranks for m in modules for f in "AB"}
    assert set(out) == want_keys
    assert torch.equal(out[HEAD_W], tensors[HEAD_W]) and torch.equal(out[HEAD_B], tensors[HEAD_B])
    for b, r in ranks.items():
        for m in modules:
            a_key, b_key = key(b, m, "A"), key(b, m, "B")
            assert torch.equal(out[a_key], tensors[a_key][:r, :])  # first r rows of A
            assert torch.equal(out[b_key], tensors[b_key][:, :r])  # first r columns of B
            assert out[a_key].shape == (r, D_IN) and out[b_key].shape == (D_OUT, r)


def test_selected_tensors_do_not_alias_the_global_lora() -> None:
    tensors = global_adapter()
    before = tensors[key(0, "query", "A")].clone()
    out = select_for_spec(tensors, spec({0: 2}))
    out[key(0, "query", "A")].add_(100.0)
    assert torch.equal(tensors[key(0, "query", "A")], before)


def test_missing_block_raises() -> None:
    tensors = global_adapter(blocks=2)
    with pytest.raises(ValueError, match=r"\(3, 'query'\)"):
        select_for_spec(tensors, spec({0: 2, 3: 2}))


def test_missing_module_raises() -> None:
    tensors = global_adapter()
    with pytest.raises(ValueError, match=r"\(0, 'key'\)"):
        select_for_spec(tensors, spec({0: 2}, ("query", "key")))


@pytest.mark.parametrize("rank", [RANK + 1, 64])
def test_rank_above_the_global_rank_raises(rank: int) -> None:
    with pytest.raises(ValueError, match=f"rank {rank}"):
        select_for_spec(global_adapter(), spec({1: rank}))


# ---- blocks_of, shapes, nbytes -------------------------------------------------------------------


def test_blocks_of_reports_block_ranks() -> None:
    # Given: a device's tensors at heterogeneous ranks, with the head
    tensors = select_for_spec(global_adapter(), spec({0: 2, 2: 5, 3: 8}))

    # Then
    assert blocks_of(tensors) == {0: 2, 2: 5, 3: 8}


def test_blocks_of_takes_the_max_rank_over_modules_and_ignores_the_head() -> None:
    tensors = {
        key(1, "query", "A"): torch.zeros(2, D_IN),
        key(1, "value", "B"): torch.zeros(D_OUT, 6),
        HEAD_W: torch.zeros(99, 99),
    }
    assert blocks_of(tensors) == {1: 6}
    assert blocks_of({HEAD_W: torch.zeros(3, 3)}) == {}


def test_shapes() -> None:
    tensors = {"a": torch.zeros(2, 3), "b": torch.zeros(5), "c": torch.tensor(1.0)}
    got = shapes(tensors)
    assert got == {"a": (2, 3), "b": (5,), "c": ()}
    assert all(isinstance(d, int) for s in got.values() for d in s)


@pytest.mark.parametrize(
    ("tensors", "want"),
    [
        ({}, 0),
        ({"a": torch.zeros(2, 3)}, 2 * 3 * 4),
        (
            {"a": torch.zeros(2, 3, dtype=torch.float16), "b": torch.zeros(7, dtype=torch.bfloat16)},
            6 * 2 + 7 * 2,
        ),
        ({"a": torch.zeros(4, dtype=torch.float64), "s": torch.tensor(1.0)}, 4 * 8 + 4),
    ],
)
def test_nbytes(tensors: dict[str, torch.Tensor], want: int) -> None:
    assert nbytes(tensors) == want


def test_nbytes_counts_views_by_their_own_size() -> None:
    base = torch.zeros(10, 10)
    assert nbytes({"v": base[:2]}) == 2 * 10 * 4
