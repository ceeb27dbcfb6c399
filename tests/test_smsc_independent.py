"""smsc.ru's client and receiver against an SMPP server that is not ours: `smpp34`'s SMSC (a Rust SMPP 3.4
stack, with its own PDU codec, binds, windowing and timers), scripted here only to accept each submit with
a fresh id, send a receipt for it in smsc.ru's text form (and the TLVs on every other one) and send one
recipient's reply. It checks what our own simulator cannot, since it shares smpplib's PDU code with the
client: that another implementation reads our submits, concatenation UDH and UCS-2 as we mean them, and
that our receiver reads its receipts and replies.

What a call centre relies on: 300 messages, long and Cyrillic among them, each part reaches the SMSC once
and reads back as the text that was written, every part's id is kept, and every part's receipt comes back
as the right outcome for that id.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import smpp34

from providers import smsc_text
from providers.base import OutgoingMessage
from providers.smsc import SmscClient
from settings import load_settings
from workflow.smpp_receiver import run_receiver
from tests.conftest import free_port, wait_until

UNDELIVERABLE_SUFFIX = "13"
REPLY = "Спасибо, заберу завтра"


class ForeignSmsc:
    """smpp34's SMPP server on a free 127.0.0.1 port, its asyncio loop in a thread. `submits` holds what
    it received: dicts of the submit's fields and the id it gave."""

    def __init__(self):
        self.port = free_port()
        self.submits: list[dict] = []
        self._ids = itertools.count(70_000_001)
        self._receivers: dict[str, smpp34.Esme] = {}
        self._unanswered: set[asyncio.Future] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="smpp34-server", daemon=True)
        self._server = smpp34.Server("127.0.0.1", self.port, system_id="smpp34")
        self._serving = None

    def start(self) -> ForeignSmsc:
        self._thread.start()
        self._in_loop(self._server.start)
        self._serving = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        return self

    def stop(self) -> None:
        self._serving.cancel()
        self._in_loop(self._server.stop)
        # smpp34 settles the deliver_sm it left unanswered from its own threads: the loop must outlive them.
        self._in_loop(self._settled)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "the smpp34 server's loop did not stop"
        self._loop.close()

    def receivers(self) -> int:
        return len(self._receivers)

    def send_reply(self, from_number: str, text: str) -> None:
        esme = next(iter(self._receivers.values()))

        async def send():
            self._deliver(esme, "", text.encode("utf-16-be"), source_addr=from_number, source_addr_ton=1,
                          source_addr_npi=1, data_coding=8)

        self._in_loop(send)

    def _in_loop(self, call):
        """Await `call()` on the server's loop and return its result: smpp34's awaitables are made
        for the loop running in the thread that calls them."""
        async def run():
            return await call()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=5)

    async def _settled(self) -> None:
        if self._unanswered:
            _, pending = await asyncio.wait(self._unanswered, timeout=4)
            assert not pending, "smpp34 did not settle every deliver_sm after stopping"

    def _deliver(self, esme: smpp34.Esme, *args, **fields) -> None:
        """Send a deliver_sm without waiting for its answer. smpp34 1.5.0's server never resolves
        `Esme.deliver_sm` (not even against smpp34's own client, whose core acknowledges it); what is
        checked here is that the receiver reads what it was sent."""
        def settled(sent: asyncio.Future) -> None:
            self._unanswered.discard(sent)
            if not sent.cancelled():
                sent.exception()  # retrieved, so that asyncio does not log it as lost

        sent = asyncio.ensure_future(esme.deliver_sm(*args, **fields))
        self._unanswered.add(sent)
        sent.add_done_callback(settled)

    async def _serve(self) -> None:
        while True:
            event = await self._server.next()
            if isinstance(event, smpp34.Esme) and event.can_receive:
                self._receivers[event.session_id] = event
            elif isinstance(event, smpp34.Unbound):
                self._receivers.pop(event.session_id, None)
            elif isinstance(event, smpp34.SubmitSmEvent):
                message_id = str(next(self._ids))
                self.submits.append({"id": message_id, "session": event.session_id,
                                     "source": event.source_addr, "destination": event.destination_addr,
                                     "esm_class": event.esm_class, "data_coding": event.data_coding,
                                     "registered_delivery": event.registered_delivery,
                                     "short_message": bytes(event.short_message)})
                event.accept(message_id)
                if event.registered_delivery:
                    receipt = self._receipt(message_id, event.source_addr, event.destination_addr,
                                            with_tlvs=len(self.submits) % 2 == 0)
                    self._loop.create_task(receipt)

    async def _receipt(self, message_id: str, source: str, destination: str, *, with_tlvs: bool) -> None:
        failed = destination.endswith(UNDELIVERABLE_SUFFIX)
        stat, err, state = ("UNDELIV", "001", 5) if failed else ("DELIVRD", "000", 2)
        stamp = time.strftime("%y%m%d%H%M")
        body = (f"id:{message_id} sub:001 dlvrd:{'000' if failed else '001'} submit date:{stamp} "
                f"done date:{stamp} stat:{stat} err:{err} text:")
        tlvs = [smpp34.Tlv(smpp34.TLV_RECEIPTED_MESSAGE_ID, message_id.encode() + b"\0"),
                smpp34.Tlv(smpp34.TLV_MESSAGE_STATE, bytes((state,)))] if with_tlvs else []
        await asyncio.sleep(0.05)
        while not self._receivers:
            await asyncio.sleep(0.05)
        esme = next(iter(self._receivers.values()))
        self._deliver(esme, source, body.encode("latin-1"), source_addr=destination, source_addr_ton=1,
                      source_addr_npi=1, esm_class=0x04, tlvs=tlvs)


def messages(n: int) -> list[tuple[str, str]]:
    """(recipient, text): short and long, GSM-7 and Cyrillic, every seventh undeliverable."""
    shapes = [
        lambda i: f"Order {i} is ready for pickup.",
        lambda i: f"Dear customer, your order {i} has been packed and will be handed to the courier "
                  "tomorrow morning; the courier calls an hour before arriving. Thank you for shopping!",
        lambda i: f"Ваш заказ {i} готов к выдаче.",
        lambda i: f"Здравствуйте! Заказ {i}: " + "доставка переносится на пятницу, извините. " * 4,
        lambda i: f"Code {i}: use it within 10 minutes {{}}[]~ (GSM-7 escapes).",
    ]
    return [(f"7916{i:05d}{UNDELIVERABLE_SUFFIX if i % 7 == 3 else '20'}", shapes[i % 5](i))
            for i in range(n)]


def text_of(parts: list[dict]) -> str:
    """The text the SMSC received in `parts` of one message, reassembled by their UDH sequence numbers."""
    def split(part):
        data = part["short_message"]
        return (data[data[0]], data[1 + data[0]:]) if part["esm_class"] & 0x40 else (1, data)

    ordered = sorted(map(split, parts))
    return smsc_text.decode(b"".join(segment for _, segment in ordered), parts[0]["data_coding"])


def test_300_messages_long_and_cyrillic_through_an_smpp_server_not_ours():
    sample = messages(300)
    layouts = {recipient: smsc_text.layout(body) for recipient, body in sample}
    assert {len(plan.segments) for plan in layouts.values()} == {1, 2, 3}
    smsc = ForeignSmsc().start()
    settings = load_settings(smsc_host="127.0.0.1", smsc_port=smsc.port, smsc_system_id="callcentre",
                             smsc_password="secret", http_timeout_s=5)
    reports, stop = [], threading.Event()

    def apply(provider, report):
        reports.append((provider, report))
        return "applied"

    receiver = threading.Thread(target=run_receiver, args=(settings, stop, apply),
                                kwargs={"reconnect_min_s": 0.1, "logins": None}, daemon=True)
    clients = [SmscClient(host="127.0.0.1", port=smsc.port, system_id="callcentre", password="secret",
                          timeout=5) for _ in range(3)]
    receiver.start()
    try:
        wait_until(smsc.receivers, 10, interval_s=0.05, what="the receiver to bind")

        def send_share(k: int) -> list:
            return [(recipient, clients[k].send(OutgoingMessage(reference=i, recipient=recipient, text=body)))
                    for i, (recipient, body) in enumerate(sample) if i % len(clients) == k]

        with ThreadPoolExecutor(len(clients)) as pool:
            accepted = dict(itertools.chain.from_iterable(pool.map(send_share, range(len(clients)))))
        total_parts = sum(len(plan.segments) for plan in layouts.values())
        wait_until(lambda: len(reports) >= total_parts, 30, what="a receipt for every part")
        smsc.send_reply(sample[0][0], REPLY)
        wait_until(lambda: len(reports) > total_parts, 10, what="the reply")
    finally:
        for client in clients:
            client.close()
        stop.set()
        receiver.join(timeout=10)
        smsc.stop()
    assert not receiver.is_alive()

    # Every part reached the SMSC once, with a receipt asked for, and reads back as the text written.
    assert len(smsc.submits) == total_parts
    assert max(Counter((s["destination"], s["short_message"][:7]) for s in smsc.submits).values()) == 1
    assert all(s["registered_delivery"] for s in smsc.submits)
    by_recipient: dict[str, list[dict]] = {}
    for submit in smsc.submits:
        by_recipient.setdefault(submit["destination"], []).append(submit)
    assert {r: text_of(parts) for r, parts in by_recipient.items()} == dict(sample)
    assert {r: parts[0]["data_coding"] for r, parts in by_recipient.items()} == \
        {r: plan.data_coding for r, plan in layouts.items()}
    # The client kept the SMSC's id of every part, in order.
    assert {r: a.provider_message_id for r, a in accepted.items()} == \
        {r: ",".join(s["id"] for s in sorted(parts, key=lambda s: s["short_message"][5:6]))
         for r, parts in by_recipient.items()}
    assert {r: a.parts for r, a in accepted.items()} == {r: len(p.segments) for r, p in layouts.items()}

    # One receipt per part, read as the right outcome for that part's id (text form and TLV form alike).
    receipts = [report for provider, report in reports if report.reply_text is None]
    assert {provider for provider, _ in reports} == {"smsc"}
    assert Counter(r.provider_message_id for r in receipts) == Counter(s["id"] for s in smsc.submits)
    expected = {s["id"]: "undelivered" if s["destination"].endswith(UNDELIVERABLE_SUFFIX) else "delivered"
                for s in smsc.submits}
    assert {r.provider_message_id: r.outcome for r in receipts} == expected
    assert all("no such number (smsc.ru error 1)" in r.reason for r in receipts if r.outcome == "undelivered")
    # And the recipient's reply, in UCS-2, read with its sender.
    replies = [(r.recipient, r.reply_text) for _, r in reports if r.reply_text is not None]
    assert replies == [(sample[0][0], REPLY)]
