"""Topic frames of the wire protocol (LIST_TOPICS, SUBSCRIBE, UNSUBSCRIBE, PUBLISH).

Filled in by the topics issue; until then these types are UNKNOWN_TYPE.
"""

from __future__ import annotations

from broker.protocol import Parser

TOPIC_PARSERS: dict[str, Parser] = {}
