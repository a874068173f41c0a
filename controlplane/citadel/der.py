"""Just enough DER for citadel's hot path: encoding a leaf around precomputed parts, and finding the
public key inside a CSR that `cryptography` has already parsed (so the input is well-formed).

Why by hand: cryptography's CertificateBuilder costs about four ECDSA signatures per certificate,
and a CSR's `public_key()` makes OpenSSL import the key twice over; both would dominate issuance.
"""

from __future__ import annotations


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _length(len(content)) + content


def integer(n: int) -> bytes:
    """A non-negative INTEGER (one spare byte for the sign bit where the top bit is set)."""
    return tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def _span(data: bytes, pos: int) -> tuple[int, int]:
    """(content start, end) of the TLV at `pos`: single-byte tags, definite lengths."""
    first = data[pos + 1]
    if first < 0x80:
        return pos + 2, pos + 2 + first
    n = first & 0x7F
    start = pos + 2 + n
    return start, start + int.from_bytes(data[pos + 2:start], "big")


def children(constructed: bytes) -> list[bytes]:
    """The TLVs directly inside a constructed TLV (a SEQUENCE), each whole."""
    pos, end = _span(constructed, 0)
    out = []
    while pos < end:
        nxt = _span(constructed, pos)[1]
        out.append(constructed[pos:nxt])
        pos = nxt
    return out


def content(element: bytes) -> bytes:
    start, end = _span(element, 0)
    return element[start:end]


def request_spki(request_info: bytes) -> bytes:
    """SubjectPublicKeyInfo of a CertificationRequestInfo (version, subject, spki, attributes)."""
    return children(request_info)[2]


def spki_key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING's bits (what RFC 5280's key identifier hashes)."""
    return content(children(spki)[1])[1:]
