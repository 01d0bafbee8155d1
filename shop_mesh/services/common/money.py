"""Money as exact integers (nano-units), never floats."""

from __future__ import annotations

from dataclasses import dataclass

NANOS_PER_UNIT = 1_000_000_000
# Which currencies, and how large an amount, a request may carry is declared once, on the
# shop.common.v1.Money message (protovalidate rules): 10^9 units = 10^18 nanos, so any amount fits a
# signed 64-bit column with room for sums of a few.


@dataclass(frozen=True, order=True)
class Money:
    currency_code: str
    total_nanos: int  # the whole amount in nano-units; sign included

    @classmethod
    def of(cls, currency_code: str, units: int, nanos: int = 0) -> Money:
        return cls(currency_code, units * NANOS_PER_UNIT + nanos)

    @classmethod
    def zero(cls, currency_code: str) -> Money:
        return cls(currency_code, 0)

    @property
    def units(self) -> int:
        # Truncate toward zero so units and nanos share the sign (google.type.Money rule).
        return (
            int(self.total_nanos / NANOS_PER_UNIT)
            if self.total_nanos < 0
            else self.total_nanos // NANOS_PER_UNIT
        )

    @property
    def nanos(self) -> int:
        return self.total_nanos - self.units * NANOS_PER_UNIT

    def _same_currency(self, other: Money) -> None:
        if other.currency_code != self.currency_code:
            raise ValueError(f"currency mismatch: {self.currency_code} vs {other.currency_code}")

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.currency_code, self.total_nanos + other.total_nanos)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.currency_code, self.total_nanos - other.total_nanos)

    def times(self, quantity: int) -> Money:
        return Money(self.currency_code, self.total_nanos * quantity)

    def __str__(self) -> str:
        sign = "-" if self.total_nanos < 0 else ""
        whole, frac = divmod(abs(self.total_nanos), NANOS_PER_UNIT)
        return f"{sign}{whole}.{frac:09d}".rstrip("0").rstrip(".") + f" {self.currency_code}"
