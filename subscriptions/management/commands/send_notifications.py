"""``manage.py send_notifications``: deliver the e-mail outbox through Django's e-mail backend."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from django.core.management.base import BaseCommand, CommandError, CommandParser

from subscriptions.notifications import DeliveryReport, deliver_due


class Command(BaseCommand):
    help = (
        "Send the pending notification e-mails (one per published message and subscribed address), "
        "retrying failures with backoff. Runs until stopped (SIGTERM or Ctrl-C finish the e-mails in "
        "hand first), or with --once until nothing is due. Several senders may run at once: each "
        "e-mail is claimed by one of them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="Send what is due now, then exit.")
        parser.add_argument("--batch", type=int, default=50, help="E-mails claimed per round (default 50).")
        parser.add_argument(
            "--interval", type=float, default=2.0, help="Seconds to wait when nothing is due (default 2)."
        )

    def handle(self, *args: object, once: bool, batch: int, interval: float, verbosity: int, **options: object) -> None:
        if batch < 1:
            raise CommandError("--batch must be at least 1")
        if interval <= 0:
            raise CommandError("--interval must be above 0")
        stopping = threading.Event()
        with self._stop_on_signals(stopping):
            total = self._run(stopping, once, batch, interval, verbosity)
        if verbosity >= 1:
            self.stdout.write(self._summary(total))

    def _run(
        self, stopping: threading.Event, once: bool, batch: int, interval: float, verbosity: int
    ) -> DeliveryReport:
        total = DeliveryReport()
        while not stopping.is_set():
            report = deliver_due(batch)
            for name in ("claimed", "sent", "retrying", "failed"):
                setattr(total, name, getattr(total, name) + getattr(report, name))
            if report.claimed:
                if verbosity >= 2:
                    self.stdout.write(self._summary(report))
                continue  # more may be due right away
            if once:
                break
            stopping.wait(interval)
        return total

    @contextlib.contextmanager
    def _stop_on_signals(self, stopping: threading.Event) -> Iterator[None]:
        # Stop between rounds rather than mid-send, so that no claimed e-mail
        # waits for its lease to run out before it is sent.
        def stop(signum: int, frame: FrameType | None) -> None:
            stopping.set()

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @staticmethod
    def _summary(report: DeliveryReport) -> str:
        return f"sent {report.sent}, will retry {report.retrying}, failed {report.failed}"
