"""How a text becomes the `short_message` octets of one or more SMPP submits to smsc.ru, and back.

Encoding (the seed, and smsc.ru's public SMPP page as digested in PROVIDERS.md):

| text                                         | data_coding | one SMS     | per concatenated part |
| -------------------------------------------- | ----------- | ----------- | --------------------- |
| fits GSM 03.38 (extension chars count two)   | 0, GSM-7 unpacked, one septet per octet | 160 | 152 |
| same, bound with system_type `ISO`           | 1, ISO-8859-1 octets | 160 | 152           |
| else fits ISO-8859-1, bound with `ISO`       | 1, ISO-8859-1 octets | 140 | 133           |
| anything else                                | 8, UCS-2 (UTF-16BE)  | 70  | 66 (code units) |

The parts of a long text carry a concatenation header with a 16-bit reference (information element 0x08,
7 octets: one character per part fewer than the common 8-bit header), the row id modulo 65,536, so that
the parts of two long messages to one phone are not put together as one. `sms_count` (what providers that
split texts themselves bill) keeps the common 8-bit figures (153, 134, 67).

With system_type `ISO` the server reads data_coding 1 as ISO-8859-1 and still sends GSM on the air when
the text fits GSM, so such texts are counted as GSM; a Latin-1 text outside GSM is counted as 8-bit data.

Our reading of the comment (`"\n~~~\n"` then free text): it is part of the text we submit and the server
strips it, neither sending nor billing it. So the encoding is chosen for the whole text (the octets must
carry the comment too), but parts are counted and split on the text before the separator only, and the
comment rides, untouched, at the end of the last part. A part may then exceed 254 octets; the client
sends such a part in the `message_payload` TLV instead of `short_message`.

Texts starting with a channel prefix (`__VIBER__:`, `__MAIL__:`, …) are not SMS for the server: they go
whole, untouched, in one submit (never split into UDH parts the server would not reassemble), and count
as one part. The client sends them only for the channels it is configured for (`SMS_SMSC_CHANNELS`); the
other providers refuse them (`providers.text.sendable_text`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

COMMENT_SEPARATOR = "\n~~~\n"
CHANNEL_PREFIXES = ("__MAIL__:", "__CALL__:", "__VIBER__:", "__SOC__:", "__TGM__:", "__BOT__:",
                    "__HLR__", "__PING__")

# GSM 03.38 default alphabet, by septet value; 0x1B is the escape to the extension table.
_GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENSION = {"\f": 0x0A, "^": 0x14, "{": 0x28, "}": 0x29, "\\": 0x2F, "[": 0x3C, "~": 0x3D,
                  "]": 0x3E, "|": 0x40, "€": 0x65}
_ESC = 0x1B
_GSM_CODE = {char: code for code, char in enumerate(_GSM_BASIC) if code != _ESC}
_GSM_DECODE_EXT = {code: char for char, code in _GSM_EXTENSION.items()}

UDH_LENGTH = 7
"""Octets of our concatenation header, its length octet included."""
MAX_SHORT_MESSAGE = 254
"""The most octets `short_message` may hold; a longer part travels in `message_payload`."""


def gsm_encode(text: str) -> bytes:
    """Unpacked GSM-7: one septet per octet, extension characters as ESC + code. `ValueError` if a
    character is outside GSM 03.38."""
    out = bytearray()
    for char in text:
        if char in _GSM_CODE:
            out.append(_GSM_CODE[char])
        elif char in _GSM_EXTENSION:
            out += bytes((_ESC, _GSM_EXTENSION[char]))
        else:
            raise ValueError("character outside the GSM 03.38 alphabet")
    return bytes(out)


def gsm_decode(data: bytes) -> str:
    """Unpacked GSM-7 octets to text; unknown escapes and octets above 0x7F are read as Latin-1 (some
    SMSCs put plain Latin-1 under data_coding 0)."""
    out, escaped = [], False
    for octet in data:
        if escaped:
            out.append(_GSM_DECODE_EXT.get(octet, " "))
            escaped = False
        elif octet == _ESC:
            escaped = True
        elif octet < 0x80:
            out.append(_GSM_BASIC[octet])
        else:
            out.append(chr(octet))
    return "".join(out)


def _fits_gsm(text: str) -> bool:
    return all(char in _GSM_CODE or char in _GSM_EXTENSION for char in text)


def _fits_latin1(text: str) -> bool:
    return all(ord(char) < 0x100 for char in text)


@dataclass(frozen=True)
class _Codec:
    data_coding: int
    single: int
    """Units one unconcatenated SMS holds."""
    part: int
    """Units one concatenated part holds behind the common 8-bit-reference header (6 octets)."""
    part16: int
    """Units one part holds behind our 16-bit-reference header (7 octets)."""
    cost: Callable[[str], int]
    encode: Callable[[str], bytes]


def _gsm_cost(char: str) -> int:
    return 2 if char in _GSM_EXTENSION else 1


def _ucs2_cost(char: str) -> int:
    return 2 if ord(char) > 0xFFFF else 1


def _latin1(text: str) -> bytes:
    return text.encode("iso-8859-1")


def _ucs2(text: str) -> bytes:
    return text.encode("utf-16-be")


GSM7 = _Codec(0, 160, 153, 152, _gsm_cost, gsm_encode)
ISO_AS_GSM = _Codec(1, 160, 153, 152, _gsm_cost, _latin1)
ISO_8BIT = _Codec(1, 140, 134, 133, lambda char: 1, _latin1)
UCS2 = _Codec(8, 70, 67, 66, _ucs2_cost, _ucs2)


def _codec_for(text: str, iso: bool) -> _Codec:
    if _fits_gsm(text):
        return ISO_AS_GSM if iso and _fits_latin1(text) else GSM7
    if iso and _fits_latin1(text):
        return ISO_8BIT
    return UCS2


@dataclass(frozen=True)
class Layout:
    """A text laid out for submission: the encoded payload of each part (no UDH yet), and how many
    parts the recipient is billed for."""

    data_coding: int
    segments: tuple[bytes, ...]
    billed_parts: int

    @property
    def concatenated(self) -> bool:
        return len(self.segments) > 1

    def short_messages(self, ref: int) -> list[bytes]:
        """The octets of each submit: for a concatenated text, each segment behind the 16-bit
        concatenation UDH (IEI 0x08) with reference `ref` modulo 65,536."""
        if not self.concatenated:
            return list(self.segments)
        total, high, low = len(self.segments), (ref >> 8) & 0xFF, ref & 0xFF
        return [bytes((UDH_LENGTH - 1, 0x08, 4, high, low, total, seq)) + segment
                for seq, segment in enumerate(self.segments, start=1)]


def channel_of(text: str) -> str | None:
    """The channel prefix of one of smsc.ru's special texts (`__VIBER__:` for `__VIBER__: …`, `__HLR__`, …)
    that are not plain SMS; None for a plain SMS."""
    return next((prefix for prefix in CHANNEL_PREFIXES if text.startswith(prefix)), None)


def channel_name(prefix: str) -> str:
    """The name `SMS_SMSC_CHANNELS` uses for a channel prefix: `viber` for `__VIBER__:`."""
    return prefix.strip("_:").lower()


def _split(body: str, codec: _Codec, part: int) -> list[str]:
    if sum(map(codec.cost, body)) <= codec.single:
        return [body]
    chunks, current, used = [], [], 0
    for char in body:
        cost = codec.cost(char)
        if used + cost > part:
            chunks.append("".join(current))
            current, used = [], 0
        current.append(char)
        used += cost
    chunks.append("".join(current))
    return chunks


def sms_count(text: str) -> int:
    """How many SMS a plain text takes on the air: GSM 03.38 when it fits (extension characters count
    two), else UCS-2. What a provider that encodes the text itself (Accolades, Ozeki) bills."""
    codec = _codec_for(text, iso=False)
    return len(_split(text, codec, codec.part)) if text else 0


def layout(text: str, *, iso: bool = False) -> Layout:
    """Lay `text` out as described in the module docstring. A text with nothing before the comment
    separator has zero billed parts (the caller refuses it)."""
    codec = _codec_for(text, iso)
    if channel_of(text):
        return Layout(codec.data_coding, (codec.encode(text),), 1)
    body, separator, comment = text.partition(COMMENT_SEPARATOR)
    if not body:
        return Layout(codec.data_coding, (), 0)
    chunks = _split(body, codec, codec.part16)
    chunks[-1] += separator + comment
    return Layout(codec.data_coding, tuple(map(codec.encode, chunks)), len(chunks))


def decode(data: bytes, data_coding: int) -> str:
    """The text of an incoming short message (its UDH already removed) by its data_coding: 8 as UCS-2,
    1 and 3 as Latin-1, anything else as GSM-7."""
    if data_coding == 8:
        return data.decode("utf-16-be", errors="replace")
    if data_coding in (1, 3):
        return data.decode("iso-8859-1")
    return gsm_decode(data)
