"""HTTP views of topics: publishing for server-side publishers, and the unsubscribe page of e-mails."""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from broker import access
from broker.protocol import ErrorCode, ProtocolError

from . import events, topics
from .protocol import parse_publish

publish = database_sync_to_async(topics.publish)
authenticate_bearer = database_sync_to_async(access.authenticate_bearer)


def _error(code: ErrorCode, message: str, status: int) -> JsonResponse:
    return JsonResponse({"code": str(code), "message": message}, status=status)


# Server-side publishers send no CSRF token; access keys guard the API instead.
@csrf_exempt
@require_http_methods(["POST"])
async def publish_message(request: HttpRequest, name: str) -> JsonResponse:
    """``POST /api/topics/<name>/messages`` with ``{"data": "..."}``: PUBLISH over HTTP.

    201 ``{"topic": name, "id": N}``; 404 ``UNKNOWN_TOPIC``; 400 ``BAD_JSON`` or
    ``BAD_FRAME`` by the rules of the PUBLISH frame. The message reaches the
    topic's WebSocket subscribers and its e-mail subscribers like any other.
    With ``TURTLEMQ_AUTH`` on: 401 ``UNAUTHORIZED`` without a valid
    ``Authorization: Bearer KEY``, 403 when the key may not publish to the topic.
    """
    if len(request.body) > settings.TURTLEMQ_MAX_FRAME_BYTES:
        return _error(ErrorCode.BAD_FRAME, "the body is larger than the frame limit", 413)
    grant = access.FULL_ACCESS
    if settings.TURTLEMQ_AUTH:
        grant = await authenticate_bearer(request.headers.get("Authorization"))
        if grant is None:
            response = _error(ErrorCode.UNAUTHORIZED, "present an access key as 'Authorization: Bearer KEY'", 401)
            response["WWW-Authenticate"] = 'Bearer realm="turtlemq"'
            return response
    try:
        body: Any = json.loads(request.body)
    except (ValueError, RecursionError):
        return _error(ErrorCode.BAD_JSON, "the body is not valid JSON", 400)
    if not isinstance(body, dict):
        return _error(ErrorCode.BAD_FRAME, 'the body must be a JSON object such as {"data": "..."}', 400)
    try:
        frame = parse_publish({**body, "type": "PUBLISH", "topic": name})
        access.authorize(grant, "PUBLISH", frame)
        published = await publish(frame.topic, frame.data)
    except access.Unauthorized as exc:
        return _error(exc.code, exc.message, 403)
    except topics.UnknownTopic as exc:
        return _error(exc.code, exc.message, 404)
    except ProtocolError as exc:
        return _error(exc.code, exc.message, 400)
    await events.announce_message(published)
    return JsonResponse({"topic": published.topic, "id": published.seq}, status=201)


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
