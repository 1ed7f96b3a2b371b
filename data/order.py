"""A keyed permutation of range(n) evaluated index by index: the per-epoch window order.

A balanced Feistel network is a bijection of its 2^(2h) domain whatever its round function;
cycle walking (applying it again while the value is >= n) restricts it to a bijection of
range(n) (Black and Rogaway, "Ciphers with arbitrary finite domains", 2002). Since the smallest
such domain is under 4n, a value needs fewer than 4 applications on average. Nothing of size n is
ever built, so memory and start-up time do not grow with the corpus.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
ROUNDS = 6
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's finaliser (Steele et al., 2014)


def mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int: a fast 64-bit bijection with good avalanche."""
    x = ((x ^ (x >> 30)) * _M1) & MASK64
    x = ((x ^ (x >> 27)) * _M2) & MASK64
    return x ^ (x >> 31)


def _mix64(x: np.ndarray) -> np.ndarray:
    """mix64 on a uint64 array (array arithmetic wraps modulo 2^64, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """One 64-bit key from any integers (seed, epoch, ...), order-sensitive."""
    key = 0
    for part in parts:
        key = mix64(((key ^ (part & MASK64)) + 0x9E3779B97F4A7C15) & MASK64)
    return key


class KeyedPermutation:
    """perm(i) for i in range(n): a bijection of range(n) fixed by the key."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1 (got {n})")
        self.n = n
        half = max(1, ((n - 1).bit_length() + 1) // 2)
        self._half, self._mask = np.uint64(half), np.uint64((1 << half) - 1)
        self._keys = [np.uint64(derive_key(key, r)) for r in range(ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"index out of range(0, {self.n})")
        out = self._feistel(index.astype(np.uint64).reshape(-1))
        outside = np.flatnonzero(out >= self.n)
        while outside.size:  # cycle walking: ends because every cycle holds its start, which is < n
            out[outside] = self._feistel(out[outside])
            outside = outside[out[outside] >= self.n]
        return out.astype(np.int64).reshape(index.shape)
