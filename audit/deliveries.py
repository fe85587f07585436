"""What the customers were actually sent, read from the file backends' output.

`make run`, the tests and the chaos run deliver email with Django's file backend
(EMAIL_FILE_PATH, one file per message) and SMS with `notifications.channels.FileSmsBackend`
(one JSON line per message in SMS_FILE_PATH/sms.log). These files are the ground truth of
"one notification per outcome": the Notification rows are the sender's own bookkeeping, and
their unique (saga, kind, channel) constraint means they can never count a message sent twice.

Each message carries its reference, `<saga id>.<kind>` (`Notification.reference`): the
email's Message-ID, the SMS's `reference`.
"""

import email
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# The file backend ends each message with a line of 79 dashes (EmailBackend.write_message).
_SEPARATOR = b"\n" + b"-" * 79 + b"\n"


@dataclass(frozen=True)
class Delivery:
    """One message as the customer's side received it."""

    channel: str  # "email" or "sms", as Notification.Channel
    reference: str  # "<saga id>.<kind>"; "" if the message names none
    to: str
    at: float  # when it was delivered, seconds since the epoch
    where: str  # the file (and line) it was read from, for the report

    @property
    def saga_id(self) -> str:
        return self.reference.partition(".")[0]

    @property
    def kind(self) -> str:
        return self.reference.partition(".")[2]


def read_deliveries(mail_dir: Path, sms_dir: Path) -> list[Delivery]:
    """Every email under `mail_dir` and SMS in `sms_dir`/sms.log, oldest first. A folder
    that does not exist holds nothing (no message was sent on that channel)."""
    found: list[Delivery] = []
    if mail_dir.is_dir():
        for path in sorted(p for p in mail_dir.iterdir() if p.is_file()):
            # The backend names a file after the second and its connection's id(), and
            # appends: two processes' connections can share a file, whose messages then
            # all read as written at its last write (a re-send is never that close).
            at = path.stat().st_mtime
            for raw in path.read_bytes().split(_SEPARATOR):
                if not raw.strip():
                    continue
                message = email.message_from_bytes(raw)
                message_id = str(message.get("Message-ID", "")).strip()
                reference = message_id[1:].partition("@")[0] if message_id.startswith("<") else ""
                found.append(Delivery("email", reference, str(message.get("To", "")), at, path.name))
    log = sms_dir / "sms.log"
    if log.is_file():
        for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            sms = json.loads(line)
            at = datetime.fromisoformat(sms["at"]).timestamp()
            found.append(Delivery("sms", sms.get("reference", ""), sms["to"], at, f"{log.name}:{number}"))
    return sorted(found, key=lambda delivery: delivery.at)
