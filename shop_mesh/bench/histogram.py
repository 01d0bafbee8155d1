"""An HDR-like latency histogram: log-linear buckets over nanoseconds, bounded memory, mergeable.

Every power-of-two range above 256 ns is split into 128 equal sub-buckets, so a recorded value is
known to within 1/128 (< 0.8 %) of itself — the same idea as HdrHistogram with ~2 significant
digits. Values up to 2^40 ns (~18 minutes) fit in 4,352 counters; anything larger is clamped to the
last bucket (and still counted exactly in `max_ns`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_SUB_BITS = 7
_SUB = 1 << _SUB_BITS  # 128 sub-buckets per power of two
_LINEAR = 2 * _SUB  # 0..255 ns are counted exactly
_MAX_BITS = 40
_BUCKETS = _LINEAR + (_MAX_BITS - _SUB_BITS - 1) * _SUB


def bucket_index(value_ns: int) -> int:
    """The bucket a value falls into."""
    if value_ns < _LINEAR:
        return max(value_ns, 0)
    bits = value_ns.bit_length()
    if bits > _MAX_BITS:
        return _BUCKETS - 1
    shift = bits - _SUB_BITS - 1
    return _LINEAR + ((shift - 1) << _SUB_BITS) + ((value_ns >> shift) - _SUB)


def bucket_bounds(index: int) -> tuple[int, int]:
    """[low, high) of a bucket in nanoseconds."""
    if index < _LINEAR:
        return index, index + 1
    k = index - _LINEAR
    shift = (k >> _SUB_BITS) + 1
    low = ((k & (_SUB - 1)) + _SUB) << shift
    return low, low + (1 << shift)


@dataclass
class Histogram:
    """Latencies in nanoseconds. `record` is the hot path: one bit_length, one shift, one add."""

    counts: list[int]
    total: int = 0
    min_ns: int = 0
    max_ns: int = 0
    sum_ns: int = 0

    @classmethod
    def empty(cls) -> Histogram:
        return cls(counts=[0] * _BUCKETS)

    def record(self, value_ns: int) -> None:
        if value_ns < 0:
            value_ns = 0
        self.counts[bucket_index(value_ns)] += 1
        if self.total == 0 or value_ns < self.min_ns:
            self.min_ns = value_ns
        if value_ns > self.max_ns:
            self.max_ns = value_ns
        self.total += 1
        self.sum_ns += value_ns

    def record_many(self, values_ns: Iterable[int]) -> None:
        for v in values_ns:
            self.record(v)

    def merge(self, other: Histogram) -> None:
        if other.total == 0:
            return
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.min_ns = other.min_ns if self.total == 0 else min(self.min_ns, other.min_ns)
        self.max_ns = max(self.max_ns, other.max_ns)
        self.total += other.total
        self.sum_ns += other.sum_ns

    @property
    def mean_ns(self) -> float:
        return self.sum_ns / self.total if self.total else 0.0

    def percentile_ns(self, pct: float) -> int:
        """The value at or below which `pct` percent of the recorded values lie (HDR semantics:
        the highest value equivalent to the bucket that crosses the rank), clamped to [min, max]."""
        if self.total == 0:
            return 0
        if pct <= 0:
            return self.min_ns
        if pct >= 100:
            return self.max_ns
        rank = max(1, _ceil(pct * self.total / 100.0))
        seen = 0
        for i, c in enumerate(self.counts):
            if not c:
                continue
            seen += c
            if seen >= rank:
                _, high = bucket_bounds(i)
                return min(max(high - 1, self.min_ns), self.max_ns)
        return self.max_ns

    def percentiles(self, pcts: Sequence[float]) -> dict[float, int]:
        return {p: self.percentile_ns(p) for p in pcts}

    def buckets(self) -> list[tuple[int, int]]:
        """Non-empty buckets as (upper bound ns, count), ascending."""
        return [(bucket_bounds(i)[1] - 1, c) for i, c in enumerate(self.counts) if c]

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "min_ns": self.min_ns,
            "max_ns": self.max_ns,
            "sum_ns": self.sum_ns,
            "buckets": [[i, c] for i, c in enumerate(self.counts) if c],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        h = cls.empty()
        for i, c in data["buckets"]:
            h.counts[int(i)] = int(c)
        h.total = int(data["total"])
        h.min_ns = int(data["min_ns"])
        h.max_ns = int(data["max_ns"])
        h.sum_ns = int(data["sum_ns"])
        return h


def _ceil(x: float) -> int:
    n = int(x)
    return n if n >= x else n + 1
