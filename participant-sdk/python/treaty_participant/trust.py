"""Which coordinators a participant serves, and which it asks about branches in doubt
(PARTICIPANT-PROTOCOL.md §3; the Rust SDK's ``trust.rs``).

Invariants:

- with any token or certificate name configured, every Prepare/Commit/Abort/Compensate
  must prove it comes from the coordinator before the barrier or user code sees it. A
  request with an ``authorization`` header is judged by its token alone, compared in
  constant time against every configured token (no early exit): a wrong or malformed
  one is UNAUTHENTICATED. Without a header, the verified client certificate's names
  must include a configured name: none is UNAUTHENTICATED, another PERMISSION_DENIED;
- with coordinator endpoints configured, a request naming another
  ``coordinator_endpoint`` (compared in canonical form) is PERMISSION_DENIED before any
  vote is recorded, and in-doubt resolution asks only those endpoints — never an address
  a request merely names. An empty ``coordinator_endpoint`` is accepted.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from . import endpoint as endpoints
from .limits import MAX_TOKEN_BYTES, MIN_TOKEN_BYTES, quote_input


class TrustRefusal(Exception):
    """A caller that is not a trusted coordinator; ``code`` is the gRPC status name
    (``UNAUTHENTICATED`` or ``PERMISSION_DENIED``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_token_value(token: str, what: str) -> None:
    """A token to accept or send: 16..512 bytes of printable ASCII without spaces."""
    if not MIN_TOKEN_BYTES <= len(token.encode("utf-8")) <= MAX_TOKEN_BYTES:
        raise ValueError(
            f"{what}: a token must be {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes"
        )
    if not all(c.isascii() and c.isprintable() and not c.isspace() for c in token):
        raise ValueError(f"{what}: a token must be printable ASCII without spaces")


def bearer_token(metadata: Iterable[tuple[str, object]]) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` header; None without the header.
    Raises :class:`TrustRefusal` (UNAUTHENTICATED) for a malformed one."""
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        if not isinstance(value, str):
            raise TrustRefusal("UNAUTHENTICATED", "the authorization header is not text")
        if not value.startswith("Bearer "):
            raise TrustRefusal(
                "UNAUTHENTICATED", "the authorization header is not `Bearer TOKEN`"
            )
        token = value[len("Bearer ") :].strip()
        if not token or len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
            raise TrustRefusal("UNAUTHENTICATED", "the bearer token is empty or too long")
        return token
    return None


@dataclass(frozen=True)
class CoordinatorTrust:
    """The coordinators a participant trusts. The default trusts every caller."""

    tokens: Sequence[str] = ()
    identities: Sequence[str] = ()
    endpoints: Sequence[str] = field(default=())

    def __post_init__(self) -> None:
        for token in self.tokens:
            check_token_value(token, "accepted_tokens")
        canonical = []
        for text in self.endpoints:
            try:
                canonical.append(str(endpoints.parse(text)))
            except endpoints.EndpointError as error:
                raise ValueError(f"trusted_coordinators: {quote_input(text)}: {error}") from None
        object.__setattr__(self, "endpoints", tuple(canonical))
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "identities", tuple(self.identities))

    def __repr__(self) -> str:
        return (
            f"CoordinatorTrust(tokens=<{len(self.tokens)} redacted>, "
            f"identities={list(self.identities)!r}, endpoints={list(self.endpoints)!r})"
        )

    @property
    def authenticates(self) -> bool:
        """Whether callers must prove who they are."""
        return bool(self.tokens) or bool(self.identities)

    def may_ask(self, endpoint: str) -> bool:
        """Whether in-doubt resolution may ask ``endpoint`` (and a request may name it)."""
        if not self.endpoints:
            return True
        return endpoints.canonical(endpoint) in self.endpoints

    def check_caller(self, metadata: Iterable[tuple[str, object]], peer_names: Sequence[str]) -> None:
        """Raises :class:`TrustRefusal` unless the call comes from a trusted coordinator."""
        if not self.authenticates:
            return
        token = bearer_token(metadata)
        if token is not None:
            presented = token.encode("utf-8")
            matched = False
            for known in self.tokens:
                matched |= hmac.compare_digest(known.encode("utf-8"), presented)
            if not matched:
                raise TrustRefusal("UNAUTHENTICATED", "the bearer token is not valid")
            return
        if not peer_names:
            raise TrustRefusal(
                "UNAUTHENTICATED",
                "only the coordinator may call: present its token or its client certificate",
            )
        if any(name in self.identities for name in peer_names):
            return
        raise TrustRefusal(
            "PERMISSION_DENIED",
            f"the client certificate of {quote_input(peer_names[0])} is not a trusted coordinator's",
        )

    def check_endpoint(self, endpoint: str) -> None:
        """Refuses a request naming a coordinator this participant does not trust."""
        if not endpoint or self.may_ask(endpoint):
            return
        raise TrustRefusal(
            "PERMISSION_DENIED",
            f"coordinator_endpoint: {quote_input(endpoint)} is not a coordinator this "
            "participant trusts",
        )
