"""Reading smsc.ru deliver_sm PDUs: receipts in text, HLR and TLV form, and recipients' replies."""
import struct
from decimal import Decimal

import pytest
from smpplib import smpp
from smpplib.client import SimpleSequenceGenerator

from providers.smsc import (
    SMSC_ERRORS,
    ReplyPart,
    parse_deliver_sm,
    parse_receipt_text,
    reply_part,
    split_vendor_tlvs,
)


def receipt(text: str, **tlvs) -> dict:
    return {"esm_class": 0x04, "source_addr": b"79001234567", "data_coding": 0,
            "short_message": text.encode("latin-1"), **tlvs}


def test_text_receipt_delivered():
    report = parse_deliver_sm(receipt(
        "id:300697496 sub:001 dlvrd:001 submit date:2406011200 done date:2406011201 stat:DELIVRD err:000 "
        "text:Hello: world stat:x"))
    assert (report.outcome, report.provider_message_id, report.reason) == ("delivered", "300697496", "")
    assert report.reply_text is None


@pytest.mark.parametrize(("stat", "err", "reason"), [
    ("UNDELIV", "001", "not delivered: the network could not deliver it: no such number (smsc.ru error 1)"),
    ("EXPIRED", "006", "not delivered: the phone was unreachable until the message expired: the subscriber "
                       "is offline (phone off or out of coverage) (smsc.ru error 6)"),
    ("UNDELIV", "013", "not delivered: the network could not deliver it: the subscriber is blocked (by the "
                       "operator, for non-payment, or at their own request) (smsc.ru error 13)"),
    ("REJECTD", "253", "not delivered: rejected by the operator or by smsc.ru: rejected by the spam filter "
                       "(smsc.ru error 253)"),
    ("DELETED", "000", "not delivered: deleted before delivery"),
    ("UNKNOWN", "999", "not delivered: the final status is unknown (smsc.ru error 999)"),
])
def test_text_receipt_undelivered_has_reason_in_words(stat, err, reason):
    report = parse_deliver_sm(receipt(f"id:55 sub:001 dlvrd:000 submit date:2406011200 "
                                      f"done date:2406011201 stat:{stat} err:{err} text:"))
    assert (report.outcome, report.reason) == ("undelivered", reason)


@pytest.mark.parametrize("stat", ["ENROUTE", "ACCEPTD"])
def test_intermediate_states_change_nothing(stat):
    assert parse_deliver_sm(receipt(f"id:55 stat:{stat} err:000")).outcome == "accepted"


def test_hlr_receipt_with_url_encoded_strings():
    text = ("id:855469 stat:DELIVRD err:000 imsi:250023012345678 msc:79010000000 mcc:250 mnc:02 "
            "cn:%D0%EE%F1%F1%E8%FF net:MegaFon+Moscow rcn: rnet:")
    fields = parse_receipt_text(text)
    assert fields["net"] == "MegaFon Moscow" and fields["mcc"] == "250" and fields["rcn"] == ""
    report = parse_deliver_sm(receipt(text))
    assert (report.outcome, report.provider_message_id) == ("delivered", "855469")
    assert report.extra["mnc"] == "02" and "imsi" not in report.extra


def test_seed_hlr_example():
    report = parse_deliver_sm(receipt("id:855469 stat:DELIVRD err:000 imsi:250023012345678"))
    assert (report.outcome, report.provider_message_id) == ("delivered", "855469")


def test_tlvs_win_over_the_text():
    report = parse_deliver_sm(receipt("id:1 stat:DELIVRD err:000", receipted_message_id=b"777",
                                      message_state=5, network_error_code=b"\x03\x00\x0d"))
    assert (report.outcome, report.provider_message_id) == ("undelivered", "777")
    assert "the subscriber is blocked" in report.reason and "(smsc.ru error 13)" in report.reason


def test_tlvs_alone_make_a_receipt():
    report = parse_deliver_sm({"esm_class": 0, "short_message": b"", "receipted_message_id": "42",
                               "message_state": 2})
    assert (report.outcome, report.provider_message_id) == ("delivered", "42")


@pytest.mark.parametrize("code", sorted(SMSC_ERRORS))
def test_every_documented_error_code_has_words_and_keeps_its_number(code):
    report = parse_deliver_sm(receipt(f"id:55 stat:UNDELIV err:{code:03d}"))
    assert report.reason.endswith(f"{SMSC_ERRORS[code]} (smsc.ru error {code})")


def deliver_sm_bytes(short_message: bytes, tlvs: list[tuple[int, bytes]]) -> bytes:
    """A deliver_sm PDU as a peer writes it, optional parameters in the order given."""
    body = (b"\0" + b"\x01\x01" + b"79001234567\0" + b"\x00\x00" + b"ACME\0" + b"\x04\x00\x00" + b"\0\0"
            + b"\x00\x00\x00\x00" + bytes((len(short_message),)) + short_message
            + b"".join(struct.pack(">HH", tag, len(value)) + value for tag, value in tlvs))
    return struct.pack(">LLLL", 16 + len(body), 0x05, 0, 9) + body


def test_smsc_vendor_tlvs_are_split_off_and_the_rest_parses_as_before():
    text = b"id:77 sub:001 dlvrd:001 submit date:2406011200 done date:2406011201 stat:DELIVRD err:000 text:"
    raw = deliver_sm_bytes(text, [(0x2000, b"2.3500\0"), (0x0427, b"\x02"), (0x2001, b"\x01"),
                                  (0x2002, b"\x03"), (0x001E, b"77\0")])
    kept, vendor = split_vendor_tlvs(raw)
    assert vendor == {0x2000: b"2.3500\0", 0x2001: b"\x01", 0x2002: b"\x03"}
    assert kept == deliver_sm_bytes(text, [(0x0427, b"\x02"), (0x001E, b"77\0")])
    pdu = smpp.parse_pdu(kept, client=SimpleSequenceGenerator())
    report = parse_deliver_sm({**vars(pdu), "vendor_tlvs": vendor})
    assert (report.outcome, report.provider_message_id) == ("delivered", "77")
    assert (report.cost, report.parts, report.extra["flags"]) == (Decimal("2.35"), 3, "01")


@pytest.mark.parametrize(("cost", "parts", "expected"), [
    (b"0.0000", b"1", (Decimal("0"), 1)),
    (b"12.5", b"\x00\x02", (Decimal("12.5"), 2)),
    (b"free", b"\x00\x00", (None, None)),
    (b"-1.00", b"", (None, None)),
])
def test_cost_and_parts_are_read_only_when_they_make_sense(cost, parts, expected):
    report = parse_deliver_sm(receipt("id:9 stat:DELIVRD err:000", vendor_tlvs={0x2000: cost, 0x2002: parts}))
    assert (report.cost, report.parts) == expected


def test_a_deliver_sm_that_cannot_be_walked_is_left_to_smpplib():
    raw = deliver_sm_bytes(b"id:1 stat:DELIVRD", [(0x2000, b"1.0000")])[:-3]
    assert split_vendor_tlvs(raw) == (raw, {})


def test_receipt_without_id_is_refused():
    with pytest.raises(ValueError):
        parse_deliver_sm(receipt("stat:DELIVRD err:000"))


def test_mo_reply_gsm():
    report = parse_deliver_sm({"esm_class": 0, "source_addr": b"+79001234567", "data_coding": 0,
                               "short_message": b"Yes, call me at 5 \x11 ok"})
    assert report.outcome == "accepted" and report.provider_message_id is None
    assert (report.reply_text, report.recipient) == ("Yes, call me at 5 _ ok", "79001234567")


def test_mo_reply_ucs2_with_udh():
    data = bytes((5, 0, 3, 9, 2, 1)) + "Да, перезвоните".encode("utf-16-be")
    report = parse_deliver_sm({"esm_class": 0x40, "source_addr": "79001234567", "data_coding": 8,
                               "short_message": data})
    assert report.reply_text == "Да, перезвоните"


@pytest.mark.parametrize("fields, part", [
    ({"esm_class": 0x40, "short_message": bytes((5, 0x00, 3, 9, 3, 2)) + b"text"}, ReplyPart(9, 3, 2)),
    ({"esm_class": 0x40, "short_message": bytes((6, 0x08, 4, 1, 2, 4, 4)) + b"text"}, ReplyPart(258, 4, 4)),
    # another element (a port address) before the concatenation one
    ({"esm_class": 0x40, "short_message": bytes((11, 0x05, 4, 0, 1, 0, 2, 0x00, 3, 5, 2, 1)) + b"x"},
     ReplyPart(5, 2, 1)),
    ({"esm_class": 0x40, "short_message": bytes((9, 0x05, 4, 0, 1, 0, 2, 0x00, 3, 5))}, None),
    ({"esm_class": 0, "short_message": b"text", "sar_msg_ref_num": 300, "sar_total_segments": 2,
      "sar_segment_seqnum": 2}, ReplyPart(300, 2, 2)),
    ({"esm_class": 0, "short_message": b"a whole reply"}, None),
    ({"esm_class": 0x40, "short_message": bytes((5, 0x00, 3, 9, 1, 1)) + b"one of one"}, None),
    ({"esm_class": 0x40, "short_message": bytes((5, 0x00, 3, 9, 2, 3)) + b"third of two"}, None),
], ids=["8-bit reference", "16-bit reference", "after another element", "cut short", "sar parameters",
        "not split",
        "one part", "inconsistent"])
def test_the_part_of_a_split_reply(fields, part):
    assert reply_part(fields) == part

