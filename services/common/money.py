"""Money as exact integers (nano-units), never floats."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import Violations

NANOS_PER_UNIT = 1_000_000_000
# The currencies this shop accepts (ISO 4217); anything else is INVALID_ARGUMENT.
SUPPORTED_CURRENCIES = frozenset(
    {"EUR", "USD", "GBP", "CHF", "JPY", "SEK", "NOK", "DKK", "PLN", "CAD", "AUD"}
)
# 10^9 units = 10^18 nanos: any amount fits a signed 64-bit column with room for sums of a few.
MAX_UNITS = 1_000_000_000


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


def validate_money(
    v: Violations,
    field: str,
    currency_code: str,
    units: int,
    nanos: int,
    *,
    positive: bool = True,
) -> Money | None:
    """Check a wire Money; on success return it, else add violations naming `field.<part>`."""
    ok = True
    if not currency_code:
        v.add(f"{field}.currency_code", "required")
        ok = False
    elif currency_code not in SUPPORTED_CURRENCIES:
        v.add(
            f"{field}.currency_code",
            f"unsupported currency {currency_code!r}; use one of " + ", ".join(sorted(SUPPORTED_CURRENCIES)),
        )
        ok = False
    if not -NANOS_PER_UNIT < nanos < NANOS_PER_UNIT:
        v.add(f"{field}.nanos", "must be between -999999999 and 999999999")
        ok = False
    elif (units > 0 and nanos < 0) or (units < 0 and nanos > 0):
        v.add(f"{field}.nanos", "must have the same sign as units")
        ok = False
    if abs(units) > MAX_UNITS:
        v.add(f"{field}.units", f"must be at most {MAX_UNITS}")
        ok = False
    if not ok:
        return None
    money = Money.of(currency_code, units, nanos)
    if positive and money.total_nanos <= 0:
        v.add(f"{field}", "must be positive")
        return None
    return money
