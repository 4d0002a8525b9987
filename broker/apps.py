"""Django app configuration for the task broker."""

from django.apps import AppConfig


class BrokerConfig(AppConfig):
    name = "broker"
    verbose_name = "Task broker"
    default_auto_field = "django.db.models.BigAutoField"
