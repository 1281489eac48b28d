"""Token store (DESIGN §7): Parquet/Arrow text → zarr int32 rows → each (dp, sp) rank reads its part.

Store layout (a zarr group):
    tokens      [n_sequences, seq_len] int32, chunks (1, chunk_len): a rank reads whole chunks of
                its own rows and shards only (chunk_len divides the sp shard length)
    next_token  [n_sequences, seq_len / chunk_len] int32: the token that follows each chunk in
                the packed stream, so the target of a shard's last token needs no read of the
                next shard
    attrs       tokenizer, vocab_size, eos_id, seq_len, chunk_len, sources, documents, tokens

Rows are consecutive windows of the stream "doc₁ EOS doc₂ EOS …"; the input at position t
is tokens[t] and its target the token after it.

Owns writing a store (`prepare_data`), opening it (`open_store`), checking all of it for
`longtrain verify` (`verify_token_store`, with the untrusted-file readers of runtime/integrity.py)
and reading each rank's batches (`ZarrTokens`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from parallel.layout import local_ranges
from runtime.errors import ConfigError
from runtime.integrity import Verified, array_meta, check_chunks, is_int, read_array, read_json
from runtime.tokenizer import ByteTokenizer, load_tokenizer

STORE_FORMAT = "longtrain-tokens-v1"


def _compressor():
    from zarr.codecs import BloscCodec, BloscShuffle

    return BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.shuffle, typesize=4)


class _ChunkFiles:
    """Writes whole chunks of a freshly created local zarr v3 array as files, encoded as its codecs
    (little-endian bytes → Blosc LZ4, byte shuffle) would encode them.

    zarr's own write path spends ≈ 0.8 ms of Python per chunk (≈ 60M tokens/s on one core) where
    the Blosc encoding and the file write take ≈ 0.2 ms; prepare-data writes millions of chunks.
    Only used for arrays this module created with exactly that layout; what it writes is read back
    through zarr in the tests.
    """

    def __init__(self, array, root: Path, name: str):
        from numcodecs import Blosc
        from zarr.codecs import BloscCodec, BytesCodec
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

        meta = array.metadata
        bytes_codec, blosc = meta.codecs
        if not (isinstance(bytes_codec, BytesCodec) and isinstance(blosc, BloscCodec)
                and isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding)):
            raise RuntimeError("the token array's layout changed; _ChunkFiles only writes bytes → Blosc arrays")
        self.key = meta.chunk_key_encoding.encode_chunk_key
        self.dir = root / name
        self.chunks = meta.chunk_grid.chunk_shape
        self.codec = Blosc(cname="lz4", clevel=1, shuffle=Blosc.SHUFFLE)
        self._made: set[Path] = set()

    def write_rows(self, first_row: int, block: np.ndarray) -> None:
        """block [rows, seq_len] int32 → chunks (1, chunk_len) of rows first_row…"""
        _, chunk_len = self.chunks
        data = np.ascontiguousarray(block, dtype="<i4")
        for i, row in enumerate(data):
            for j in range(row.size // chunk_len):
                path = self.dir / self.key((first_row + i, j))
                if path.parent not in self._made:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._made.add(path.parent)
                path.write_bytes(self.codec.encode(row[j * chunk_len : (j + 1) * chunk_len]))


def default_chunk_len(seq_len: int) -> int:
    """64K tokens (256 KiB) when that divides the row, else the whole row.

    Zarr pays a fixed cost per chunk (≈ 0.4 ms), so chunks of 64K tokens write at ~90M tokens/s
    where 8K-token chunks manage ~16M. A rank reads whole chunks: when the sp shard is shorter than
    a chunk it reads the chunk and keeps its part — pass --chunk-len = the shard length
    (seq_len / sp, or seq_len / 2sp under zigzag) to read exactly its own bytes.
    """
    return 65536 if seq_len % 65536 == 0 else seq_len


def _input_files(path: Path) -> tuple[list[str], str]:
    if not path.exists():
        raise ConfigError(f"input {str(path)!r} does not exist; pass a Parquet/Arrow file or a folder of them")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    exts = {p.suffix.lower() for p in files}
    if exts <= {".parquet", ".pq"}:
        fmt = "parquet"
    elif exts <= {".arrow", ".feather", ".ipc"}:
        fmt = "ipc"
    else:
        raise ConfigError(f"input {str(path)!r} holds {sorted(exts)} files; use .parquet or .arrow files (not mixed)")
    if not files:
        raise ConfigError(f"input folder {str(path)!r} is empty")
    return [str(p) for p in files], fmt


def prepare_data(input_path: str, output: str, seq_len: int, text_column: str = "text", tokenizer: str = "byte",
                 chunk_len: int | None = None, batch_rows: int = 8192, overwrite: bool = False,
                 progress: Callable[[int], None] | None = None) -> dict:
    """Stream text from Parquet/Arrow, tokenize, pack rows of `seq_len` tokens, write the store.

    The store is written under a temporary name and renamed at the end, so `output` never holds
    a half-written store; an existing `output` is refused unless `overwrite`.
    """
    import pyarrow.dataset as ds

    if seq_len < 2:
        raise ConfigError(f"--seq-len {seq_len} must be ≥ 2")
    chunk_len = chunk_len or default_chunk_len(seq_len)
    if chunk_len < 1 or seq_len % chunk_len:
        raise ConfigError(f"--chunk-len {chunk_len} must divide --seq-len {seq_len}")
    out = Path(output)
    if out.exists() and not overwrite:
        raise ConfigError(f"output {output!r} already exists; choose another path or pass --overwrite")
    src, dst = Path(input_path).resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ConfigError(f"output {output!r} overlaps the input {input_path!r}; write the store outside the input")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"the parent of output {output!r} is a file; choose an output inside a folder")
    files, fmt = _input_files(Path(input_path))
    try:
        dataset = ds.dataset(files, format=fmt)
        names = dataset.schema.names
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"input {input_path!r} is not readable {fmt} ({str(e).splitlines()[0][:160]}); "
                          f"pass Parquet or Arrow files") from None
    if text_column not in names:
        raise ConfigError(f"input has no column {text_column!r}; its columns are {dataset.schema.names}; "
                          f"pass --text-column")
    tok = load_tokenizer(tokenizer)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        return _write_store(dataset, text_column, tok, files, out, tmp, seq_len, chunk_len, batch_rows, progress)
    except BaseException as e:  # nothing half-written stays behind, whatever failed
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConfigError(f"cannot write {output!r} ({type(e).__name__}: {e.strerror or e}); "
                              f"choose a writable output") from None
        raise


def _write_store(dataset, text_column: str, tok, files: list[str], out: Path, tmp: Path, seq_len: int,
                 chunk_len: int, batch_rows: int, progress: Callable[[int], None] | None) -> dict:
    """Tokenize and pack into the store at `tmp`, then rename it to `out`."""
    import pyarrow.compute as pc
    import zarr

    group = zarr.open_group(str(tmp), mode="w")
    n_chunks = seq_len // chunk_len
    tokens = group.create_array("tokens", shape=(0, seq_len), chunks=(1, chunk_len), dtype="int32",
                                compressors=_compressor())
    next_token = group.create_array("next_token", shape=(0, n_chunks), chunks=(4096, n_chunks), dtype="int32")

    chunk_files = _ChunkFiles(tokens, tmp, "tokens")
    rows_per_write = max(1, (1 << 24) // seq_len)  # write ~64 MiB at a time
    pending: list[np.ndarray] = []
    n_pending = n_rows = docs = total = text_bytes = 0
    start = time.perf_counter()

    def write(rows: int) -> None:
        nonlocal pending, n_pending, n_rows
        stream = np.concatenate(pending)
        block = stream[: rows * seq_len].reshape(rows, seq_len)
        # the token after chunk j of a row: the first token of chunk j+1 (or of the next row)
        follow = stream[chunk_len : rows * seq_len + 1 : chunk_len].reshape(rows, n_chunks)
        tokens.resize((n_rows + rows, seq_len))
        next_token.resize((n_rows + rows, n_chunks))
        chunk_files.write_rows(n_rows, block)
        next_token[n_rows : n_rows + rows] = follow
        n_rows += rows
        rest = stream[rows * seq_len :]
        pending, n_pending = [rest], rest.size

    scanner = dataset.scanner(columns=[text_column], batch_size=batch_rows)
    for batch in scanner.to_batches():
        column = batch.column(0)
        ids, n_docs = tok.encode_column(column)
        if not isinstance(tok, ByteTokenizer) and ids.size and ids.max(initial=0) >= tok.vocab_size:
            raise ConfigError("the tokenizer produced ids beyond its vocabulary")
        text_bytes += int(pc.sum(pc.binary_length(column)).as_py() or 0)
        docs += n_docs
        total += ids.size
        pending.append(ids)
        n_pending += ids.size
        while n_pending >= rows_per_write * seq_len + 1:  # +1: each row needs the token after it
            write(rows_per_write)
        if progress is not None:
            progress(text_bytes)
    full = (n_pending - 1) // seq_len if n_pending else 0
    if full > 0:
        write(full)
    if n_rows == 0:
        raise ConfigError(f"the input holds {total} tokens, fewer than one row of --seq-len {seq_len}; "
                          f"use a shorter --seq-len or more text")
    seconds = time.perf_counter() - start
    info = dict(format=STORE_FORMAT, tokenizer=tok.name, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                seq_len=seq_len, chunk_len=chunk_len, sources=files, documents=docs, tokens=total,
                sequences=n_rows, dropped_tokens=total - n_rows * seq_len, text_bytes=text_bytes,
                seconds=round(seconds, 3))
    group.attrs.update(info)
    if out.exists():  # --overwrite: replace only now that the new store is complete
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def open_store(path: str):
    """The store's zarr group, or a one-line ConfigError for a missing or corrupt store."""
    import zarr

    if not Path(path).exists():
        raise ConfigError(f"token store {path!r} does not exist; create it with `longtrain prepare-data`")
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
        tokens, follow = group["tokens"], group["next_token"]
    except Exception as e:
        raise ConfigError(f"token store {path!r} is not a longtrain token store ({type(e).__name__}); "
                          f"re-create it with `longtrain prepare-data`") from None
    if attrs.get("format") != STORE_FORMAT or tokens.ndim != 2 or follow.shape[0] != tokens.shape[0]:
        raise ConfigError(f"token store {path!r} is incomplete or corrupt; re-create it with `longtrain prepare-data`")
    return group, attrs


def verify_token_store(path: str | Path) -> Verified:
    """Check a whole token store: attributes consistent, every chunk of `tokens` and `next_token`
    present and decodable, token ids in the vocabulary, `next_token` equal to the token that follows each
    chunk. Reads the whole store once, a block of rows at a time."""
    path = Path(path)
    fail = lambda what: ConfigError(f"token store {path}: {what}; re-create it with `longtrain prepare-data`")
    meta = read_json(path / "zarr.json", fail)
    attrs = meta.get("attributes")
    if meta.get("node_type") != "group" or not isinstance(attrs, dict) or attrs.get("format") != STORE_FORMAT:
        raise fail(f"{path / 'zarr.json'} is not a group with format attribute {STORE_FORMAT!r}")
    for key in ("vocab_size", "eos_id", "seq_len", "chunk_len", "sequences", "tokens", "dropped_tokens"):
        if not is_int(attrs.get(key)) or attrs[key] < 0:
            raise fail(f"attribute {key} is missing or not a non-negative integer")
    seq_len, chunk_len, rows, vocab = attrs["seq_len"], attrs["chunk_len"], attrs["sequences"], attrs["vocab_size"]
    if seq_len < 2 or chunk_len < 1 or seq_len % chunk_len or vocab < 1 or attrs["eos_id"] >= vocab:
        raise fail(f"attributes seq_len={seq_len}, chunk_len={chunk_len}, vocab_size={vocab}, "
                   f"eos_id={attrs['eos_id']} are inconsistent")
    if attrs["tokens"] - attrs["dropped_tokens"] != rows * seq_len:
        raise fail(f"attributes tokens - dropped_tokens = {attrs['tokens'] - attrs['dropped_tokens']} is not "
                   f"sequences × seq_len = {rows * seq_len}")
    n_chunks = seq_len // chunk_len
    arrays = {"tokens": ([rows, seq_len], [1, chunk_len]), "next_token": ([rows, n_chunks], None)}
    metas = {}
    for name, (shape, chunks) in arrays.items():
        metas[name] = m = array_meta(path / name / "zarr.json", fail)
        got = m["chunk_grid"]["configuration"]["chunk_shape"]
        if m["data_type"] != "int32" or m["shape"] != shape or (chunks is not None and got != chunks):
            raise fail(f"array {name} is {m['data_type']}{m['shape']} in chunks {got}; the attributes say "
                       f"int32{shape}" + (f" in chunks {chunks}" if chunks else ""))
        check_chunks(path / name, m, fail, name)
    result = Verified(arrays=2, attrs=attrs)
    block = max(1, (1 << 22) // seq_len)
    before = None  # next_token of the previous block's last row: the first token of this block
    for lo in range(0, rows, block):
        hi = min(rows, lo + block)
        where = f"rows {lo}-{hi - 1}"
        x = read_array(path / "tokens", metas["tokens"], fail, f"tokens ({where})", np.s_[lo:hi])
        f = read_array(path / "next_token", metas["next_token"], fail, f"next_token ({where})", np.s_[lo:hi])
        if min(x.min(), f.min()) < 0 or max(x.max(), f.max()) >= vocab:
            raise fail(f"{where} hold token ids outside [0, {vocab})")
        if not (np.array_equal(f[:, :-1], x[:, chunk_len::chunk_len]) and np.array_equal(f[:-1, -1], x[1:, 0])
                and (before is None or before == x[0, 0])):
            raise fail(f"next_token of {where} does not match the tokens that follow each chunk")
        before = f[-1, -1]
        result.nbytes += x.nbytes + f.nbytes
    return result


class ZarrTokens:
    """Batches of a token store for one (dp, sp) rank: its rows, its shards, only those chunks.

    Step s of the run reads batch `position` of `epoch` (s = epoch·batches_per_epoch + position);
    rows are shuffled per epoch, deterministically in (seed, epoch). The cursor (epoch, position)
    of the next step goes into checkpoints.
    """

    def __init__(self, path: str, seq_len: int, batch_size: int, dp_rank: int, dp: int, sp_rank: int, sp: int,
                 layout: str, seed: int, window: int = 0):
        group, attrs = open_store(path)
        self.tokens, self.follow = group["tokens"], group["next_token"]
        self.attrs = attrs
        if attrs["seq_len"] != seq_len:
            raise ConfigError(f"token store {path!r} has rows of {attrs['seq_len']} tokens but train.seq_len="
                              f"{seq_len}; set train.seq_len={attrs['seq_len']} or prepare the data again")
        self.n_rows = self.tokens.shape[0]
        if self.n_rows < batch_size:
            raise ConfigError(f"token store {path!r} holds {self.n_rows} sequences, fewer than "
                              f"train.batch_size={batch_size}; lower the batch size or add data")
        self.seq_len, self.chunk_len = seq_len, attrs["chunk_len"]
        self.batch_size, self.per_replica, self.dp_rank = batch_size, batch_size // dp, dp_rank
        self.ranges = local_ranges(seq_len, sp_rank, sp, layout, window)  # this rank's pieces, in local order
        self.seed = seed
        self.batches_per_epoch = self.n_rows // batch_size
        self._perm_epoch, self._perm = -1, None

    @property
    def vocab_size(self) -> int:
        return int(self.attrs["vocab_size"])

    def cursor(self, step: int) -> tuple[int, int]:
        """(epoch, position) of global step `step`."""
        return divmod(step, self.batches_per_epoch)

    def _rows(self, epoch: int, position: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._perm_epoch = epoch
        first = position * self.batch_size + self.dp_rank * self.per_replica
        return self._perm[first : first + self.per_replica]

    def _token_after(self, row: int, end: int) -> int:
        """The token following position end−1 of a row."""
        if end % self.chunk_len == 0:
            return int(self.follow[row, end // self.chunk_len - 1])
        return int(self.tokens[row, end])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [per_replica, T_local] int32 of this rank for global step `step`.

        Plain per-row slices (zarr's orthogonal indexing is several times slower for the same chunks).
        """
        rows = [int(r) for r in self._rows(*self.cursor(step))]
        x = np.empty((len(rows), sum(hi - lo for lo, hi in self.ranges)), dtype=np.int32)
        y = np.empty_like(x)
        for i, row in enumerate(rows):
            start = 0
            for lo, hi in self.ranges:
                part = slice(start, start + hi - lo)
                start = part.stop
                x[i, part] = self.tokens[row, lo:hi]
                y[i, part.start : part.stop - 1] = x[i, part.start + 1 : part.stop]
                y[i, part.stop - 1] = self._token_after(row, hi)
        return torch.from_numpy(x), torch.from_numpy(y)
