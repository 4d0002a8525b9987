"""``manage.py purge_tasks --older-than DURATION``: delete finished tasks that are old enough."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from broker import dispatch
from broker.durations import parse_duration
from broker.models import Task


class Command(BaseCommand):
    help = (
        "Delete finished tasks (done, failed or cancelled) that finished longer ago than --older-than, "
        "whether or not their client collected the outcome; queued and assigned tasks are never touched. "
        "Connection and broker process rows closed before then go too."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            required=True,
            metavar="DURATION",
            help="How long ago a task must have finished to be deleted: 30s, 15m, 12h, 7d, 2w or 1d12h.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only count the tasks that would be deleted.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            older_than = parse_duration(options["older_than"])
            cutoff = timezone.now() - older_than
        except ValueError as exc:
            raise CommandError(f"--older-than: {exc}") from None
        except OverflowError:
            raise CommandError(f"--older-than: {options['older_than']!r} reaches back before the year 1") from None
        if options["dry_run"]:
            count = Task.objects.finished_before(cutoff).count()
            self.stdout.write(f"{count} finished {_tasks(count)} would be deleted (dry run).")
            return
        count = dispatch.purge_finished_tasks(older_than)
        self.stdout.write(f"{count} finished {_tasks(count)} deleted.")


def _tasks(count: int) -> str:
    return "task" if count == 1 else "tasks"
