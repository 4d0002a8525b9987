"""The four starter topics of the original MessageQueue-System, each with a description of ours."""

from django.db import migrations

STARTER_TOPICS = {
    "SpringBoot": "Spring Boot: releases, starters and patterns for building Java services on the Spring platform.",
    "NodeJs": "Node.js: runtime releases, npm ecosystem news and server-side JavaScript practice.",
    "React": "React: releases, hooks, server components and the tooling around building user interfaces.",
    "Django": "Django: releases, security advisories and practice for the Python web framework (and Channels).",
}


def create_starter_topics(apps, schema_editor):
    Topic = apps.get_model("subscriptions", "Topic")
    for name, description in STARTER_TOPICS.items():
        Topic.objects.get_or_create(name=name, defaults={"description": description})


def remove_starter_topics(apps, schema_editor):
    Topic = apps.get_model("subscriptions", "Topic")
    # Only topics nobody has used yet: never delete published messages.
    Topic.objects.filter(name__in=STARTER_TOPICS, last_message_id=0).delete()


class Migration(migrations.Migration):
    dependencies = [("subscriptions", "0001_initial")]

    operations = [migrations.RunPython(create_starter_topics, remove_starter_topics)]
