"""``manage.py create_topic NAME``: create a topic that peers can publish and subscribe to."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from subscriptions import events, topics


class Command(BaseCommand):
    help = (
        "Create a topic. A name is dot-separated words of letters, digits, '_' and '-' "
        "(news.sports.tennis). Connections following a matching pattern start following it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The topic's name, e.g. news.sports.")
        parser.add_argument(
            "--description", default="", help="The first line of the topic's content (SUBSCRIBED.data)."
        )

    def handle(self, *args: object, name: str, description: str, **options: object) -> None:
        try:
            created = topics.create_topic(name, description)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        except topics.TopicExists as exc:
            raise CommandError(str(exc)) from None
        events.announce_topic_created_from_sync(created)
        self.stdout.write(f"Created topic {created.name}")
