"""prepare-data and the sharded token loader."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from launch.cli import main
from parallel.layout import shard_sequence
from runtime.data import ZarrTokens, prepare_data
from runtime.errors import ConfigError

DOCS = ["hello world", "ß and ü are two bytes each", None, "", "x" * 100, "the end."]


def _stream(docs: list[str | None]) -> np.ndarray:
    out = []
    for d in docs:
        out += list((d or "").encode()) + [256]
    return np.array(out, dtype=np.int32)


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(60)), "text": DOCS * 10}), path, row_group_size=7)
    return path


def test_prepare_data_byte_tokens_and_counts(parquet, tmp_path) -> None:
    out = tmp_path / "store.zarr"
    info = prepare_data(str(parquet), str(out), seq_len=32, chunk_len=8, batch_rows=5)
    stream = _stream(DOCS * 10)
    n = (stream.size - 1) // 32
    assert (info["documents"], info["tokens"], info["sequences"]) == (60, stream.size, n)
    assert info["dropped_tokens"] == stream.size - n * 32
    g = zarr.open_group(str(out), mode="r")
    assert dict(g.attrs)["vocab_size"] == 257 and g["tokens"].chunks == (1, 8)
    np.testing.assert_array_equal(g["tokens"][...], stream[: n * 32].reshape(n, 32))
    np.testing.assert_array_equal(g["next_token"][...], stream[8 : n * 32 + 1 : 8].reshape(n, 4))


def test_prepare_data_arrow_folder_and_hf_tokenizer(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "arrow"
    folder.mkdir()
    for i in range(2):
        feather.write_feather(pa.table({"body": ["a b c", "c b a b"] * 5}), folder / f"part{i}.arrow")
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "</s>": 3, "[UNK]": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    info = prepare_data(str(folder), str(tmp_path / "s.zarr"), seq_len=8, text_column="body",
                        tokenizer=str(tmp_path / "tok.json"))
    assert info["vocab_size"] == 5 and info["eos_id"] == 3 and info["documents"] == 20
    assert info["tokens"] == 2 * 5 * (4 + 5)
    row0 = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["tokens"][0]
    assert row0.tolist() == [0, 1, 2, 3, 2, 1, 0, 1]


def test_prepare_data_errors_keep_existing_output(parquet, tmp_path, capsys) -> None:
    out = tmp_path / "store.zarr"
    prepare_data(str(parquet), str(out), seq_len=32, chunk_len=8)
    before = zarr.open_group(str(out), mode="r")["tokens"][...]
    assert main(["prepare-data", "--input", str(parquet), "--seq-len", "16", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["tokens"][...], before)
    for args, message in [
        (["--input", str(tmp_path / "none.parquet")], "does not exist"),
        (["--input", str(parquet), "--text-column", "body"], "has no column 'body'"),
        (["--input", str(parquet), "--chunk-len", "5"], "must divide --seq-len"),
    ]:
        assert main(["prepare-data", "--seq-len", "32", "--output", str(tmp_path / "o.zarr"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("sp", [1, 2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_loader_reads_exactly_its_rows_and_shards(tmp_path, sp: int, layout: str) -> None:
    docs = [" ".join(str(i) for i in range(j, j + 40)) for j in range(200)]
    out = tmp_path / "s.zarr"
    prepare_data_table(docs, tmp_path, out)
    g = zarr.open_group(str(out), mode="r")
    tokens, follow = g["tokens"][...], g["next_token"][...]
    stream_next = np.concatenate([tokens[:, 1:], follow[:, -1:]], axis=1)  # target of every position
    dp, batch = 2, 4
    for step in (0, 3, 1000):  # 1000 wraps around epochs
        seen_rows = []
        for d in range(dp):
            for r in range(sp):
                loader = ZarrTokens(str(out), 64, batch, d, dp, r, sp, layout, seed=7)
                x, y = loader.batch(step)
                epoch, pos = loader.cursor(step)
                rows = np.random.default_rng([7, epoch]).permutation(loader.n_rows)[
                    pos * batch + d * 2 : pos * batch + d * 2 + 2]
                np.testing.assert_array_equal(x.numpy(), shard_sequence(
                    torch.from_numpy(tokens[rows]), r, sp, layout).numpy())
                np.testing.assert_array_equal(y.numpy(), shard_sequence(
                    torch.from_numpy(stream_next[rows]), r, sp, layout).numpy())
            seen_rows += list(rows)
        assert len(set(seen_rows)) == batch  # dp replicas read disjoint rows


def prepare_data_table(docs: list[str], tmp_path, out) -> None:
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    prepare_data(str(tmp_path / "d.parquet"), str(out), seq_len=64, chunk_len=8)


def test_loader_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ZarrTokens(str(tmp_path / "none.zarr"), 64, 4, 0, 1, 0, 1, "zigzag", 0)
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a longtrain token store"):
        ZarrTokens(str(tmp_path / "junk.zarr"), 64, 4, 0, 1, 0, 1, "zigzag", 0)
    prepare_data_table(["some text here"] * 50, tmp_path, tmp_path / "s.zarr")
    with pytest.raises(ConfigError, match="set train.seq_len=64"):
        ZarrTokens(str(tmp_path / "s.zarr"), 128, 4, 0, 1, 0, 1, "zigzag", 0)
