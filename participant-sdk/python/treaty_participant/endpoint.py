"""Endpoints (``http://host:port``, ``https://host:port``) parsed strictly into one
canonical form, as ``participant-sdk/src/endpoint.rs`` does.

Why strict: the participant compares a request's ``coordinator_endpoint`` with the
coordinators it trusts, so two spellings of one target must not slip past the list.

Invariants:

- every accepted input maps to one canonical string, and inputs naming the same scheme,
  host and port map to the same one: scheme and name lower-cased, one trailing dot and
  one trailing ``/`` dropped, IPv6 in RFC 5952 form, an IPv4-mapped IPv6 address written
  as the IPv4 address it is;
- an accepted endpoint holds only ASCII letters, digits and ``.-:/[]``;
- a host is a DNS name, four decimal octets without leading zeros, or a bracketed IPv6
  address without zone. Names are not resolved.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .limits import MAX_ENDPOINT_BYTES, FieldError, quote_input

_MAX_NAME_BYTES = 253
_MAX_LABEL_BYTES = 63


class EndpointError(ValueError):
    """Why an endpoint was refused; the message does not repeat the input."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "http" or "https"
    host: str  # canonical: a lower-case name, dotted quad, or "[v6]"
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def target(self) -> str:
        """What grpcio dials: ``host:port`` without the scheme (brackets kept)."""
        return f"{self.host}:{self.port}"

    @property
    def uses_tls(self) -> bool:
        return self.scheme == "https"


def _allowed(character: str) -> bool:
    return character.isascii() and (character.isalnum() or character in ".-:/[]")


def parse(text: str) -> Endpoint:
    """Parses ``text`` or raises :class:`EndpointError`."""
    if not text:
        raise EndpointError("must not be empty")
    if len(text.encode("utf-8")) > MAX_ENDPOINT_BYTES:
        raise EndpointError(
            f"is {len(text.encode('utf-8'))} bytes long; the limit is {MAX_ENDPOINT_BYTES}"
        )
    for character in text:
        if not _allowed(character):
            if character == "@":
                raise EndpointError("user information (`user@`) is not allowed")
            if character in "?#":
                raise EndpointError(
                    "nothing but an optional `/` may follow the port (no path, query or fragment)"
                )
            raise EndpointError(
                f"contains {character!r}; only ASCII letters, digits and . - : / [ ] are "
                "allowed (no whitespace, control characters or percent-encoding)"
            )
    scheme, separator, rest = text.partition("://")
    if not separator or scheme.lower() not in ("http", "https"):
        raise EndpointError("the scheme must be http:// or https://")
    authority = rest[:-1] if rest.endswith("/") else rest
    if "/" in authority:
        raise EndpointError(
            "nothing but an optional `/` may follow the port (no path, query or fragment)"
        )
    host, port = _split_host_port(authority)
    return Endpoint(scheme.lower(), _parse_host(host), _parse_port(port))


def _split_host_port(authority: str) -> tuple[str, str]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise EndpointError(_BAD_IPV6)
        host, rest = authority[: end + 1], authority[end + 1 :]
        if not rest.startswith(":"):
            raise EndpointError("the port is missing")
        return host, rest[1:]
    host, separator, port = authority.rpartition(":")
    if not separator:
        raise EndpointError("the port is missing")
    if ":" in host:
        raise EndpointError("an IPv6 address must be written in brackets, as in http://[::1]:7000")
    return host, port


def _parse_port(text: str) -> int:
    if not text:
        raise EndpointError("the port is missing")
    if text.startswith("0") or not text.isdigit() or not text.isascii() or int(text) > 65535:
        raise EndpointError(
            "the port must be a number from 1 to 65535, without sign or leading zeros"
        )
    return int(text)


_BAD_IPV6 = "the brackets hold no IPv6 address (zone ids such as %eth0 are not allowed)"
_NUMERIC = (
    "a numeric host must be four decimal octets without leading zeros, such as 127.0.0.1 "
    "(127.1, 2130706433, 0x7f.0.0.1 and 0177.0.0.1 are refused spellings of it)"
)


def _parse_host(text: str) -> str:
    if not text:
        raise EndpointError("the host is missing")
    if text.startswith("["):
        if not text.endswith("]"):
            raise EndpointError(_BAD_IPV6)
        try:
            address = ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise EndpointError(_BAD_IPV6) from None
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.packed[:12] == bytes(12) and address.packed[12:14] != bytes(2):
            raise EndpointError(
                "IPv4-compatible IPv6 addresses (::a.b.c.d) are deprecated and ambiguous; "
                "write the IPv4 address"
            )
        return f"[{address.compressed}]"
    if ":" in text:
        raise EndpointError("an IPv6 address must be written in brackets, as in http://[::1]:7000")
    name = text[:-1] if text.endswith(".") else text
    if _ends_in_a_number(name):
        if len(name) != len(text):
            raise EndpointError(_NUMERIC)
        octets = name.split(".")
        if len(octets) != 4 or not all(
            octet.isdigit() and (octet == "0" or not octet.startswith("0")) and int(octet) <= 255
            for octet in octets
        ):
            raise EndpointError(_NUMERIC)
        return name
    return _dns_name(name)


def _ends_in_a_number(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    if last and last.isdigit():
        return True
    if last[:2] in ("0x", "0X"):
        return all(c in "0123456789abcdefABCDEF" for c in last[2:])
    return False


def _dns_name(name: str) -> str:
    if len(name) > _MAX_NAME_BYTES:
        raise EndpointError("the host is not a DNS name: longer than 253 bytes")
    for label in name.split("."):
        if not label:
            raise EndpointError("the host is not a DNS name: a label is empty")
        if len(label) > _MAX_LABEL_BYTES:
            raise EndpointError("the host is not a DNS name: a label is longer than 63 bytes")
        if not all(c.isascii() and (c.isalnum() or c == "-") for c in label):
            raise EndpointError(
                "the host is not a DNS name: labels hold only letters, digits and hyphens"
            )
        if label.startswith("-") or label.endswith("-"):
            raise EndpointError("the host is not a DNS name: a label starts or ends with a hyphen")
    return name.lower()


def parse_field(field: str, text: str) -> Endpoint:
    """Parses an endpoint from a request field; the error names the field (INVALID_ARGUMENT)."""
    try:
        return parse(text)
    except EndpointError as error:
        message = str(error)
        if message == "must not be empty" or message.startswith("is "):
            raise FieldError(field, message) from None
        raise FieldError(
            field,
            f"{quote_input(text)} is not an endpoint of the form http(s)://host:port: {message}",
        ) from None


def canonical(text: str) -> str:
    """The canonical form of ``text``, or ``text`` itself if it does not parse (it then
    matches only itself)."""
    try:
        return str(parse(text))
    except EndpointError:
        return text
