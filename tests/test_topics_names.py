"""Topic names and subscription patterns: what is valid and what matches what."""

import pytest
from django.core.exceptions import ValidationError

from subscriptions.names import has_wildcards, is_pattern, is_topic_name, matches, validate_topic_name


@pytest.mark.parametrize("name", ["Django", "news", "news.sports.tennis", "a-b_c.9", "x" * 200])
def test_dot_separated_words_are_topic_names(name):
    assert is_topic_name(name)
    validate_topic_name(name)


@pytest.mark.parametrize(
    "name", ["", "news.", ".news", "news..sports", "news.*", "#", "news sports", "nëws", "x" * 201, "a/b"]
)
def test_empty_words_wildcards_and_other_characters_are_not_topic_names(name):
    assert not is_topic_name(name)
    with pytest.raises(ValidationError):
        validate_topic_name(name)


@pytest.mark.parametrize("pattern", ["news", "news.*", "news.#", "#", "*", "*.sports.#", "#.tennis"])
def test_patterns_use_star_and_hash_as_whole_words(pattern):
    assert is_pattern(pattern)


@pytest.mark.parametrize("pattern", ["", "news*", "news.sp#rts", "news..*", "**", "news.", "a b"])
def test_wildcards_inside_words_and_empty_words_are_not_patterns(pattern):
    assert not is_pattern(pattern)


def test_only_patterns_with_star_or_hash_have_wildcards():
    assert has_wildcards("news.*") and has_wildcards("#")
    assert not has_wildcards("news.sports")


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("news", "news", True),
        ("news", "News", False),
        ("news", "news.sports", False),
        ("news.*", "news.sports", True),
        ("news.*", "news", False),
        ("news.*", "news.sports.tennis", False),
        ("*", "news", True),
        ("*", "news.sports", False),
        ("news.#", "news", True),
        ("news.#", "news.sports", True),
        ("news.#", "news.sports.tennis", True),
        ("news.#", "newsletter", False),
        ("#", "anything.at.all", True),
        ("#.tennis", "tennis", True),
        ("#.tennis", "news.sports.tennis", True),
        ("#.tennis", "news.sports", False),
        ("news.#.tennis", "news.tennis", True),
        ("news.#.tennis", "news.sports.tennis", True),
        ("news.#.tennis", "news.sports.golf", False),
        ("*.sports.#", "news.sports", True),
        ("*.sports.#", "sports.news", False),
        ("#.*", "news", True),
        ("#.*", "news.sports", True),
        ("*.#.*", "news", False),
        ("#.#", "news.sports", True),
    ],
)
def test_star_matches_exactly_one_word_and_hash_zero_or_more(pattern, name, expected):
    assert matches(pattern, name) is expected
