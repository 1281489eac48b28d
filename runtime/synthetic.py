"""Synthetic long-context tasks, deterministic from (seed, step, row), at any sequence length.

Targets are -100 (ignored) except where the task asks a question, so loss and accuracy
measure recall alone.

- **mqar** (multi-query associative recall): the sequence opens with `num_pairs` distinct
  key–value pairs k₁ v₁ k₂ v₂ …; then keys are asked again at random, as "k v", until the
  sequence ends, and the model must predict v after k. Chance accuracy is 1/|values|.
- **passkey**: filler tokens with "<key> d₁ … d_n" hidden at a random place; the sequence
  ends with "<ask> d₁ … d_n" and the model must produce the digits. Chance is 1/10 per digit.
- **zipf**: dense next-token prediction (every position is a target) on tokens drawn independently from
  one Zipf law, P(rank r) ∝ (r + 1)^−1.1, over a fixed permutation of the vocabulary (seeded by the run's
  seed, the same for every step). Its loss falls from ≈ ln V towards the law's entropy (`zipf_entropy`)
  as the model learns the unigram statistics: the check that optimisation works end to end, which MQAR
  with one sequence per step is not (its few pairs change every step).
"""

from __future__ import annotations

import torch

from runtime.errors import ConfigError

IGNORE = -100
TASKS = ("mqar", "passkey", "zipf")
ZIPF_EXPONENT = 1.1


def zipf_probabilities(vocab_size: int) -> torch.Tensor:
    """P(rank r) ∝ (r + 1)^−ZIPF_EXPONENT, r = 0 … V−1 (float64)."""
    p = torch.arange(1, vocab_size + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
    return p / p.sum()


def zipf_entropy(vocab_size: int) -> float:
    """The zipf task's lowest expected loss (nats per token): the entropy of its law."""
    p = zipf_probabilities(vocab_size)
    return float(-(p * p.log()).sum())


class SyntheticTask:
    def __init__(self, kind: str, vocab_size: int, seq_len: int, seed: int, num_pairs: int = 8,
                 passkey_digits: int = 5):
        if kind not in TASKS:
            raise ConfigError(f"data.source=synthetic:{kind} is unknown; use one of " +
                              ", ".join(f"synthetic:{t}" for t in TASKS))
        self.kind, self.vocab, self.seq_len, self.seed = kind, vocab_size, seq_len, seed
        self.num_pairs, self.digits = num_pairs, passkey_digits
        if kind == "mqar":
            self.n_keys = (vocab_size - 1) // 2  # token 0 is noise; keys 1..n_keys; values above
            if num_pairs > self.n_keys or num_pairs < 1:
                raise ConfigError(f"data.num_pairs={num_pairs} must be in 1..{self.n_keys} for vocab {vocab_size}")
            if seq_len < 4 * num_pairs + 1:
                raise ConfigError(f"train.seq_len={seq_len} is too short for MQAR with {num_pairs} pairs; "
                                  f"use ≥ {4 * num_pairs + 1}")
        elif kind == "zipf":
            self.zipf_p = zipf_probabilities(vocab_size)
            self.zipf_tokens = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
        else:
            if vocab_size < 16:
                raise ConfigError(f"passkey needs a vocabulary of ≥ 16 tokens; model.vocab_size={vocab_size}")
            if seq_len < 3 * (passkey_digits + 1):
                raise ConfigError(f"train.seq_len={seq_len} is too short for a {passkey_digits}-digit passkey")

    def rows(self, step: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [len(rows), seq_len] int64 for global rows `rows` of batch `step`."""
        pairs = [self._row(torch.Generator().manual_seed(hash((self.seed, step, r)) & (2**62 - 1))) for r in rows]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _row(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        x = torch.zeros(T + 1, dtype=torch.int64)
        y = torch.full((T,), IGNORE, dtype=torch.int64)
        if self.kind == "mqar":
            P = self.num_pairs
            keys = torch.randperm(self.n_keys, generator=g)[:P] + 1
            values = torch.randint(self.n_keys + 1, self.vocab, (P,), generator=g)
            x[0 : 2 * P : 2], x[1 : 2 * P : 2] = keys, values
            n_q = (T + 1 - 2 * P) // 2  # every later two-token slot asks a key again
            where = 2 * P + 2 * torch.arange(n_q)
            which = torch.randint(0, P, (n_q,), generator=g)
            x[where], x[where + 1] = keys[which], values[which]
            y[where] = values[which]
        elif self.kind == "zipf":
            x[:] = self.zipf_tokens[torch.multinomial(self.zipf_p, T + 1, replacement=True, generator=g)]
            y = x[1:].clone()
        else:
            n = self.digits
            key_tok, ask_tok, digit0 = 11, 12, 1
            x[:] = torch.randint(13, self.vocab, (T + 1,), generator=g)
            digits = torch.randint(0, 10, (n,), generator=g) + digit0
            at = int(torch.randint(0, T - 2 * (n + 1), (1,), generator=g))
            x[at], x[at + 1 : at + 1 + n] = key_tok, digits
            ask = T - n  # x[ask] = <ask>, then digits; predict each digit from the token before it
            x[ask], x[ask + 1 : ask + 1 + n] = ask_tok, digits
            y[ask : ask + n] = digits
        return x[:T], y
