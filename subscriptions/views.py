"""HTTP views of topics: the unsubscribe page behind every notification e-mail's link."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from . import topics


# A mail client's one-click unsubscribe (RFC 8058) POSTs without any cookie or
# CSRF token; the unguessable token in the URL is the credential.
@csrf_exempt
@require_http_methods(["GET", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    """GET shows a page that asks for confirmation; POST ends the subscription at once."""
    if request.method == "POST":
        subscription = topics.unsubscribe_by_token(token)
        template = "subscriptions/unsubscribed.html"
    else:
        subscription = topics.subscription_by_token(token)
        template = "subscriptions/unsubscribe_confirm.html"
    if subscription is None:
        return render(request, "subscriptions/unsubscribe_unknown.html", status=404)
    return render(request, template, {"subscription": subscription})
