"""The interactive menu of the original MessageQueue-System client, on TurtleMQ topics.

1 lists the topics; 2 picks a topic and registers an e-mail address for it,
then shows its live updates; 3 publishes an update to that topic; 4 shows the
menu again; q quits, removing the e-mail subscription. Commands are read line
by line from standard input (so a script or a test can drive it), updates are
printed as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from typing import TextIO

from .errors import BrokerError
from .lines import Lines
from .subscriber import Subscriber

MENU = """\
==== TurtleMQ topics ====
1. List topics
2. Subscribe to a topic with your e-mail address
3. Publish an update to your topic
4. Show this menu
q. Quit"""

# A practical check, not RFC 5322: one @, no spaces, a dotted domain of letters, digits and hyphens.
EMAIL_RE = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)


def valid_email(address: str) -> bool:
    """Whether ``address`` looks like an e-mail address worth sending to the broker."""
    return len(address) <= 254 and EMAIL_RE.fullmatch(address) is not None


class Menu:
    """One interactive session: a subscriber connection, the chosen topic and e-mail address."""

    def __init__(self, subscriber: Subscriber, lines: Lines, out: TextIO) -> None:
        self.subscriber = subscriber
        self.lines = lines
        self.out = out
        self.topic: str | None = None
        self.email: str | None = None

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def ask(self, prompt: str) -> str | None:
        self.say(prompt)
        line = await self.lines.readline()
        return None if line is None else line.strip()

    async def run(self) -> None:
        """Show the menu and answer commands until ``q`` or the end of the input."""
        printer = asyncio.create_task(self._print_updates())
        try:
            self.say(MENU)
            while True:
                choice = await self.ask("Choice (1-4, q):")
                if choice is None or choice.lower() in ("q", "quit"):
                    await self.quit()
                    return
                try:
                    await self.handle(choice)
                except BrokerError as exc:
                    self.say(f"The broker refused: {exc}")
        finally:
            printer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await printer

    async def handle(self, choice: str) -> None:
        if choice == "1":
            await self.list_topics()
        elif choice == "2":
            await self.subscribe()
        elif choice == "3":
            await self.publish()
        elif choice == "4":
            self.say(MENU)
        elif choice:
            self.say(f"Unknown choice {choice!r}.")

    async def list_topics(self) -> list[str]:
        topics = await self.subscriber.list_topics()
        self.say("Topics:")
        for number, name in enumerate(topics, 1):
            self.say(f"  {number}. {name}")
        return topics

    async def subscribe(self) -> None:
        topics = await self.list_topics()
        answer = await self.ask("Topic (name or number):")
        if not answer:
            return
        topic = topics[int(answer) - 1] if answer.isdigit() and 1 <= int(answer) <= len(topics) else answer
        if topic not in topics:
            self.say(f"There is no topic {topic!r}.")
            return
        email = await self.ask("Your e-mail address:")
        if not email:
            return
        if not valid_email(email):
            self.say(f"{email!r} is not a valid e-mail address.")
            return
        if self.topic is not None:
            await self._leave()
        content = await self.subscriber.subscribe(topic, email=email)
        self.topic, self.email = topic, email
        self.say(f"Subscribed to {topic} as {email}. Current content:")
        self.say(content)
        self.say(f"Live updates of {topic} follow.")

    async def publish(self) -> None:
        if self.topic is None:
            self.say("Subscribe to a topic first (2).")
            return
        data = await self.ask(f"Update for {self.topic}:")
        if data is None:
            return
        message_id = await self.subscriber.publish(self.topic, data)
        self.say(f"Published update #{message_id} to {self.topic}.")

    async def quit(self) -> None:
        if self.topic is not None:
            await self._leave()
        self.say("Bye.")

    async def _leave(self) -> None:
        topic, email = self.topic, self.email
        assert topic is not None
        await self.subscriber.unsubscribe(topic, email=email)
        self.topic = self.email = None
        self.say(f"Unsubscribed {email} from {topic}.")

    async def _print_updates(self) -> None:
        async for message in self.subscriber:
            self.say(f"[{message.topic} #{message.id}] {message.data}")


async def run_menu(url: str, *, token: str | None = None, give_up_after: float | None = None) -> None:
    """Run the interactive menu against the broker at ``url`` on standard input and output."""
    async with Subscriber(url, token=token, give_up_after=give_up_after) as subscriber:
        await Menu(subscriber, Lines(), sys.stdout).run()
