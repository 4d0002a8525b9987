"""The broker's system checks: the database must support what the hot path's SQL uses."""

from __future__ import annotations

from django.db import connection

from broker.checks import check_update_returning


def test_the_test_database_passes_the_check():
    assert check_update_returning(databases=["default"]) == []


def test_a_database_without_update_returning_is_reported(monkeypatch):
    monkeypatch.setattr(connection.features, "can_return_columns_from_insert", False)
    (error,) = check_update_returning(databases=["default"])
    assert error.id == "broker.E002"
    assert "RETURNING" in error.msg
