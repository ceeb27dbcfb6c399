"""How texts become SMPP parts for smsc.ru: encodings, part counts, the comment, channel prefixes."""
import pytest

from providers import smsc_text
from providers.base import OutgoingMessage, PermanentError
from providers.smsc import SmscClient


def client(**options) -> SmscClient:
    # check() sends nothing, so no server is needed behind this address.
    return SmscClient(host="127.0.0.1", port=9, system_id="u", password="p", **options)


def msg(text: str) -> OutgoingMessage:
    return OutgoingMessage(reference=7, recipient="79001234567", text=text)


@pytest.mark.parametrize(("text", "coding", "parts"), [
    ("a" * 160, 0, 1),
    ("a" * 161, 0, 2),
    ("a" * 152 * 2, 0, 2),       # 152 per part behind the 16-bit concatenation header
    ("a" * (152 * 2 + 1), 0, 3),
    ("[" * 80, 0, 1),           # extension characters count double: 160 septets
    ("[" * 81, 0, 2),
    ("Я" * 70, 8, 1),
    ("Я" * 71, 8, 2),
    ("Я" * 66 * 3, 8, 3),
    ("Я" * (66 * 3 + 1), 8, 4),
    ("ok 👍" * 14, 8, 1),        # a character outside the BMP takes two UCS-2 code units: 70 units
    ("ok 👍" * 15, 8, 2),
])
def test_encoding_and_part_count(text, coding, parts):
    plan = smsc_text.layout(text)
    assert (plan.data_coding, plan.billed_parts) == (coding, parts)
    assert client(max_parts=10).check(msg(text)) == parts


def test_gsm_parts_never_split_an_escape_pair_and_decode_back():
    text = "x" + "€" * 100
    plan = smsc_text.layout(text)
    assert plan.billed_parts == 2
    assert all(len(segment) <= 152 for segment in plan.segments)
    assert "".join(smsc_text.decode(s, 0) for s in plan.segments) == text


def test_ucs2_parts_never_split_a_surrogate_pair():
    text = "я" + "👍" * 40
    plan = smsc_text.layout(text)
    assert "".join(smsc_text.decode(s, 8) for s in plan.segments) == text


def test_iso_system_type_sends_latin1_octets():
    assert smsc_text.layout("Hello [x]", iso=True).segments == (b"Hello [x]",)
    assert smsc_text.layout("Hello [x]", iso=True).data_coding == 1
    # counted as GSM on the air: 160 characters in one part
    assert client(system_type="ISO").check(msg("a" * 160)) == 1
    # Latin-1 outside GSM: 8-bit, 140 per SMS
    assert smsc_text.layout("â" * 141, iso=True).billed_parts == 2
    assert smsc_text.layout("Привет", iso=True).data_coding == 8


def test_comment_is_not_counted_and_rides_on_the_last_part():
    comment = "\n~~~\nbatch 42, operator Ivanov"
    text = "a" * 160 + comment
    assert client().check(msg(text)) == 1
    long_text = "b" * 200 + comment
    plan = smsc_text.layout(long_text)
    assert plan.billed_parts == 2
    assert smsc_text.decode(plan.segments[-1], 0).endswith(comment)
    assert "".join(smsc_text.decode(s, 0) for s in plan.segments) == long_text


def test_cyrillic_comment_makes_the_whole_submit_ucs2():
    plan = smsc_text.layout("Hello\n~~~\nкомментарий")
    assert plan.data_coding == 8 and plan.billed_parts == 1


def test_channel_prefixes_go_whole_and_untouched():
    text = "__VIBER__: " + "long viber text " * 30
    plan = smsc_text.layout(text)
    assert len(plan.segments) == 1 and plan.billed_parts == 1
    assert smsc_text.decode(plan.segments[0], plan.data_coding) == text
    assert client(channels={"mail"}).check(msg("__MAIL__: hi\nsubj:Test")) == 1


def test_a_channel_prefix_is_refused_unless_its_channel_is_enabled():
    with pytest.raises(PermanentError, match="viber channel is not enabled"):
        client(channels={"mail"}).check(msg("__VIBER__: hi"))
    assert client(channels={"viber"}).check(msg("__VIBER__: hi")) == 1


@pytest.mark.parametrize(("text", "reason"), [("", "empty"), ("   ", "empty"),
                                              ("\n~~~\nonly a comment", "nothing to send")])
def test_empty_text_is_refused(text, reason):
    with pytest.raises(PermanentError, match=reason):
        client().check(msg(text))


def test_too_many_parts_is_refused_before_sending():
    with pytest.raises(PermanentError, match="7 SMS parts, at most 6"):
        client().check(msg("Я" * 66 * 7))


def test_parts_carry_a_16_bit_reference():
    parts = smsc_text.layout("Я" * 100).short_messages(ref=0x12345)
    assert [p[:7] for p in parts] == [bytes((6, 0x08, 4, 0x23, 0x45, 2, seq)) for seq in (1, 2)]


def test_other_providers_keep_the_common_part_sizes():
    assert smsc_text.sms_count("a" * 153 * 2) == 2 and smsc_text.sms_count("Я" * 67 * 3) == 3


def test_bad_recipient_is_refused():
    with pytest.raises(PermanentError):
        client().check(OutgoingMessage(reference=1, recipient="+7 900", text="hi"))
