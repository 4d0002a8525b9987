"""``manage.py create_access_key NAME --roles client,worker [--topics PATTERN ...]``: make an access key."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from broker import access


class Command(BaseCommand):
    help = (
        "Create an access key and print it: it is shown only this once (only its hash is stored). "
        "Peers present it when TURTLEMQ_AUTH is on; revoke it in the admin."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="Who or what uses the key.")
        parser.add_argument(
            "--roles",
            required=True,
            help=f"Comma-separated roles the key grants: {', '.join(sorted(access.ROLES))}.",
        )
        parser.add_argument(
            "--topics",
            nargs="+",
            default=[],
            metavar="PATTERN",
            help="Topic patterns (* one word, # any words) to which publishing and subscribing are limited; "
            "default: every topic.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        roles = [role.strip() for role in options["roles"].split(",") if role.strip()]
        if not roles:
            raise CommandError("--roles: name at least one role")
        try:
            access_key, key = access.create_key(options["name"], roles, options["topics"])
        except ValueError as exc:
            raise CommandError(f"--roles: {exc}") from None
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        # The key alone on stdout, so that a script can capture it; the rest on stderr.
        self.stdout.write(key)
        self.stderr.write(
            f"Created access key {access_key.name!r} ({access_key.prefix}...) with roles "
            f"{', '.join(sorted(access_key.roles))} and topics {', '.join(access_key.topic_patterns) or 'all'}. "
            "It is shown only this once.",
            style_func=self.style.SUCCESS,
        )
