"""Limits on what crosses Treaty's wire, and the checks that enforce them.

They match the Rust SDK (``participant-sdk/src/limits.rs``) byte for byte, so a request
the coordinator sends is accepted by every SDK alike. A failed check raises
:class:`FieldError`, whose text starts with the field's name: the server turns it into
INVALID_ARGUMENT as it is, before the barrier or user code sees the request.
"""

from __future__ import annotations

#: Largest branch payload (and saga compensation payload), in bytes.
MAX_PAYLOAD_BYTES = 16 * 1024
#: Longest transaction or branch id, in bytes.
MAX_ID_BYTES = 64
#: Longest participant or coordinator endpoint, in bytes.
MAX_ENDPOINT_BYTES = 256
#: Longest free-text reason (a NO vote's), in bytes; longer ones are cut.
MAX_REASON_BYTES = 1024
#: Most bytes of a client's input quoted back in an error message.
MAX_QUOTED_INPUT_BYTES = 200
#: Largest gRPC message the server accepts, in bytes.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Longest bearer token accepted, in a request or in configuration.
MAX_TOKEN_BYTES = 512
#: Shortest bearer token configured (accepted, or sent to a coordinator), as the
#: coordinator's token file and the Rust SDK require: a token is what lets a
#: participant listen beyond loopback, so a short one would be guessed.
MIN_TOKEN_BYTES = 16

_ID_PUNCTUATION = frozenset("._:-")


class FieldError(ValueError):
    """A request field that breaks a rule. ``str()`` starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_id(field: str, value: str) -> None:
    """An id: 1..=64 bytes of ``[A-Za-z0-9._:-]``."""
    if not value:
        raise FieldError(field, "must not be empty")
    length = len(value.encode("utf-8"))
    if length > MAX_ID_BYTES:
        raise FieldError(field, f"is {length} bytes long; the limit is {MAX_ID_BYTES}")
    for character in value:
        if not (character.isascii() and (character.isalnum() or character in _ID_PUNCTUATION)):
            raise FieldError(
                field,
                f"contains {character!r}; only letters, digits and . _ : - are allowed",
            )


def check_payload(field: str, payload: bytes) -> None:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise FieldError(field, f"is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}")


def truncate_reason(text: str) -> str:
    """Cuts free text to at most MAX_REASON_BYTES of UTF-8, on a character boundary,
    marking the cut with an ellipsis (as the Rust SDK does before recording a reason)."""
    encoded = text.encode("utf-8")
    if len(encoded) <= MAX_REASON_BYTES:
        return text
    ellipsis = "…"
    budget = MAX_REASON_BYTES - len(ellipsis.encode("utf-8"))
    return encoded[:budget].decode("utf-8", errors="ignore") + ellipsis


def quote_input(text: str) -> str:
    """Quotes what a client sent for an error message: at most MAX_QUOTED_INPUT_BYTES of
    it, with control and invisible characters escaped, so it can neither inflate the
    message nor reach a terminal raw."""
    encoded = text.encode("utf-8")
    if len(encoded) <= MAX_QUOTED_INPUT_BYTES:
        return '"' + _escape(text) + '"'
    cut = encoded[:MAX_QUOTED_INPUT_BYTES].decode("utf-8", errors="ignore")
    return f'"{_escape(cut)}"… ({len(encoded)} bytes)'


def _escape(text: str) -> str:
    out = []
    for character in text:
        if character in '"\\':
            out.append("\\" + character)
        elif character.isprintable() and character.isascii():
            out.append(character)
        elif character.isprintable() and not character.isspace() and ord(character) > 0x7F:
            out.append(character)
        else:
            out.append(f"\\u{{{ord(character):x}}}")
    return "".join(out)
