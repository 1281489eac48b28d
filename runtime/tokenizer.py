"""Tokenizers for prepare-data: a built-in byte-level one, or a Hugging Face `tokenizers` JSON file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from runtime.errors import ConfigError

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0…255; 256 is the end-of-document separator (vocab 257)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode_column(self, texts: pa.Array) -> tuple[np.ndarray, int]:
        """All documents of a string column as one int32 stream, EOS after each; (tokens, documents)."""
        texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
        if pa.types.is_large_string(texts.type) or pa.types.is_string(texts.type):
            texts = texts.fill_null("")
            off_type = np.int64 if pa.types.is_large_string(texts.type) else np.int32
            _, offsets_buf, data_buf = texts.buffers()
            offsets = np.frombuffer(offsets_buf, dtype=off_type)[texts.offset : texts.offset + len(texts) + 1]
            data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
            base = int(offsets[0])
            out = np.empty(int(offsets[-1]) - base + len(texts), dtype=np.int32)
            # document i's bytes land shifted by i (the EOS tokens before it): one slice copy per document
            for i, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
                out[start - base + i : end - base + i] = data[start:end]
                out[end - base + i] = self.eos_id
            return out, len(texts)
        raise ConfigError(f"the text column has type {texts.type}, not string; pick a string column with --text-column")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (e.g. tokenizer.json of a Llama model)."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("--tokenizer FILE.json needs the `tokenizers` package: pip install tokenizers") from None
        if not Path(path).is_file():
            raise ConfigError(f"tokenizer file {str(path)!r} does not exist; pass a tokenizer.json or 'byte'")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise ConfigError(f"tokenizer file {str(path)!r} could not be read: {e}") from None
        self.name = str(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        ids = [self.tok.token_to_id(n) for n in EOS_NAMES]
        self.eos_id = next((i for i in ids if i is not None), self.vocab_size)
        self.vocab_size = max(self.vocab_size, self.eos_id + 1)

    def encode_column(self, texts: pa.Array) -> tuple[np.ndarray, int]:
        docs = [t if t is not None else "" for t in texts.to_pylist()]
        encoded = self.tok.encode_batch(docs, add_special_tokens=False)
        parts = []
        for e in encoded:
            parts += [np.asarray(e.ids, dtype=np.int32), np.array([self.eos_id], dtype=np.int32)]
        return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), len(docs)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)
