"""Django app configuration for topics, publish/subscribe and e-mail notification."""

from django.apps import AppConfig


class SubscriptionsConfig(AppConfig):
    name = "subscriptions"
    verbose_name = "Topics and subscriptions"
    default_auto_field = "django.db.models.BigAutoField"
