"""The topic tables: starter topics and the constraints that keep topics consistent."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError

from subscriptions.models import EmailOutbox, Message, Subscription, Topic


@pytest.mark.django_db
def test_migrations_create_the_four_starter_topics_with_descriptions():
    starters = {
        topic.name: topic for topic in Topic.objects.filter(name__in=["SpringBoot", "NodeJs", "React", "Django"])
    }
    assert sorted(starters) == ["Django", "NodeJs", "React", "SpringBoot"]
    for topic in starters.values():
        assert topic.description.strip()
        assert topic.last_message_id == 0


@pytest.mark.django_db
def test_a_topic_name_must_be_dot_separated_words():
    with pytest.raises(ValidationError):
        Topic(name="news..sports").full_clean()
    Topic(name="news.sports", description="").full_clean()


@pytest.mark.django_db
def test_two_messages_of_one_topic_cannot_share_a_sequence_number():
    topic = Topic.objects.create(name="models.seq")
    Message.objects.create(topic=topic, seq=1, data="a")
    with pytest.raises(IntegrityError):
        Message.objects.create(topic=topic, seq=1, data="b")


@pytest.mark.django_db
def test_an_address_subscribes_to_a_topic_once_with_its_own_unsubscribe_token():
    topic = Topic.objects.create(name="models.subs")
    first = Subscription.objects.create(topic=topic, address="a@example.com")
    other = Subscription.objects.create(topic=Topic.objects.create(name="models.other"), address="a@example.com")
    assert first.token and other.token and first.token != other.token
    assert len(first.token) >= 40
    with pytest.raises(IntegrityError):
        Subscription.objects.create(topic=topic, address="a@example.com")


@pytest.mark.django_db
def test_every_outbox_row_gets_its_own_message_id_header():
    topic = Topic.objects.create(name="models.outbox")
    message = Message.objects.create(topic=topic, seq=1, data="a")
    one = Subscription.objects.create(topic=topic, address="a@example.com")
    two = Subscription.objects.create(topic=topic, address="b@example.com")
    rows = [
        EmailOutbox.objects.create(message=message, subscription=s, address=s.address, next_try_at=message.created_at)
        for s in (one, two)
    ]
    headers = [row.message_id_header for row in rows]
    assert headers[0] != headers[1]
    assert all(h.startswith("<") and h.endswith(">") and "@" in h for h in headers)
