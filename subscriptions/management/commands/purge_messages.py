"""``manage.py purge_messages --keep N``: bound the stored history of every topic."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from subscriptions import topics


class Command(BaseCommand):
    help = (
        "Delete all but the newest N messages of every topic. Messages whose e-mails are not sent "
        "yet are kept. Sequence numbers are never reused; SUBSCRIBE with 'since' replays what is left."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--keep", type=int, required=True, help="How many of each topic's newest messages to keep.")

    def handle(self, *args: object, keep: int, **options: object) -> None:
        if keep < 0:
            raise CommandError("--keep must be 0 or more")
        deleted = topics.purge_messages(keep)
        self.stdout.write(f"Deleted {deleted} message{'' if deleted == 1 else 's'}")
