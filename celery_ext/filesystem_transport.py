"""kombu's filesystem transport (the broker of `make demo`), with each message put in place whole.

kombu 5.7's filesystem `Channel._put` creates a message's file in the queue folder, then writes it; a
consumer that lists the folder in between takes the empty file, and the worker stops with "Unrecoverable
error: JSONDecodeError" (seen in `make test`'s demo run: the demo then waited for rows no worker was left
to send). Here a message is written under a name no consumer takes (`PARTIAL_SUFFIX`: kombu's `_get`,
`_size` and `_purge` only look at names ending in `<queue>.msg`) and renamed into place, which is atomic
within one folder.

Written against kombu 5.7.0; `tests/test_celery_ext_filesystem_transport.py` checks it against the pinned kombu.
`celeryconfig` selects it for `filesystem://` brokers.
"""
from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

PARTIAL_SUFFIX = ".part"


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        """Put `payload` onto `queue`: written whole, then renamed to the name kombu's `_get` takes."""
        filename = os.path.join(self.data_folder_out,
                                f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg")
        partial = filename + PARTIAL_SUFFIX
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, filename)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {filename!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel

