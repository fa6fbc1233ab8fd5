"""How old a transaction is, read from its id.

The coordinator names every transaction with a UUIDv7 in canonical form (lowercase,
hyphenated): its first 48 bits are the millisecond it was created, by the coordinator's
clock. The barrier's retention measures age from there (PARTICIPANT-PROTOCOL.md §11).

Invariants the retention code relies on (as ``participant-sdk/src/transaction_age.rs``):

- canonical UUIDv7 ids sort bytewise in the order of their creation millisecond, so every
  id created before ``t`` sorts below :func:`first_transaction_id_at` ``(t)``;
- any other id has no known age (:func:`transaction_created_unix_ms` returns ``None``):
  its records are never collected and its calls never refused for age.
"""

from __future__ import annotations

_HEX = frozenset("0123456789abcdef")
_HYPHENS = (8, 13, 18, 23)


def transaction_created_unix_ms(transaction_id: str) -> int | None:
    """Creation time of a transaction named by a canonical UUIDv7, in Unix ms; else None."""
    if len(transaction_id) != 36:
        return None
    for index, character in enumerate(transaction_id):
        if index in _HYPHENS:
            if character != "-":
                return None
        elif character not in _HEX:
            return None
    # Version 7, RFC 4122 variant.
    if transaction_id[14] != "7" or transaction_id[19] not in "89ab":
        return None
    return int(transaction_id[0:8] + transaction_id[9:13], 16)


def first_transaction_id_at(unix_ms: int) -> str:
    """The smallest canonical UUIDv7 created at ``unix_ms``."""
    unix_ms = max(0, min(unix_ms, (1 << 48) - 1))
    hex_ms = f"{unix_ms:012x}"
    return f"{hex_ms[:8]}-{hex_ms[8:]}-7000-8000-000000000000"
