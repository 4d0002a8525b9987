"""HTTP routes of topics: the unsubscribe link of notification e-mails."""

from django.urls import path

from . import views

app_name = "subscriptions"

urlpatterns = [
    path("unsubscribe/<str:token>", views.unsubscribe, name="unsubscribe"),
]
