"""HTTP routes of topics: publishing over HTTP and the unsubscribe link of notification e-mails."""

from django.urls import path

from . import views

app_name = "subscriptions"

urlpatterns = [
    path("api/topics/<str:name>/messages", views.publish_message, name="publish"),
    path("unsubscribe/<str:token>", views.unsubscribe, name="unsubscribe"),
]
