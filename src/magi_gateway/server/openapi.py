"""The OpenAPI 3.1 description of the ``/v1`` API, served at ``GET /v1/openapi.json``."""

from __future__ import annotations

from typing import Any

__all__ = ["OPENAPI"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_SESSION_ID = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
_SSE = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "description": (
            "One event per session message: `id: <seq>`, `event: <type>`, `data: <the WebSocket "
            "frame>`; `: keepalive` comments when idle; ends after `agent_judgement_complete` "
            "(or with an `error` event whose data is an Error)."
        ),
    }
}


def _errors(*statuses: int, stream: bool = False) -> dict[str, Any]:
    """The error responses of a route (``stream``: one answering an event stream)."""
    text = {
        400: "Invalid body or parameter (invalid_json, missing_field, invalid_field, too_many_agents...)",
        401: "Authentication failed (auth_failed)",
        404: "No such session for this appid, or expired (session_not_found)",
        409: "The session has completed already (session_completed)",
        413: "Body over MAX_FRAME_BYTES (frame_too_large)",
        429: "Rate limited, quota or throttled (rate_limited, too_many_sessions, too_many_connections, "
        "auth_throttled)",
        # A stream of a running session is one of its viewers (checked before any event).
        **(
            {
                429: "Rate limited, quota, throttled or the session followed by MAX_VIEWERS_PER_SESSION "
                "viewers already (rate_limited, too_many_sessions, too_many_connections, auth_throttled, "
                "too_many_viewers)"
            }
            if stream
            else {}
        ),
        503: "Redis unavailable, instance restarting or at SSE_MAX_STREAMS "
        "(backend_unavailable, service_restart, too_many_streams)",
    }
    return {
        str(status): {"description": text[status], "content": {"application/json": {"schema": _ERROR}}}
        for status in statuses
    }


_SECURITY: list[dict[str, list[str]]] = [
    {"bearer": []},
    {"appidHeader": [], "tokenHeader": []},
    {"appidQuery": [], "tokenQuery": []},
]

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Magi Gateway HTTP API",
        "version": "1",
        "description": "Judgement sessions over HTTP and Server-Sent Events: the same sessions, "
        "seqs and frames as the WebSocket at /ws.",
    },
    "security": _SECURITY,
    "paths": {
        "/v1/judgements": {
            "post": {
                "summary": "Start a judgement",
                "description": "With `Accept: text/event-stream` the response is the session as SSE "
                "from seq 1; otherwise 202. A repeated `request_id` answers with its earlier session.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Judgement"}}},
                },
                "responses": {
                    "200": {"description": "The session's events", "content": _SSE},
                    "202": {
                        "description": "Accepted",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}
                        },
                    },
                    **_errors(400, 401, 413, 429, 503, stream=True),
                },
            }
        },
        "/v1/sessions/{session_id}/events": {
            "get": {
                "summary": "Follow a session",
                "description": "The messages after `Last-Event-ID` (or `?last_seq`, default 0), then "
                "live, until the session completes; from any gateway instance. While the session "
                "runs the stream is one of its viewers: over MAX_VIEWERS_PER_SESSION, 429 "
                "too_many_viewers (a completed session's stream only replays and is never refused).",
                "parameters": [
                    _SESSION_ID,
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "last_seq", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": {
                    "200": {"description": "The session's events", "content": _SSE},
                    **_errors(400, 401, 404, 429, 503, stream=True),
                },
            }
        },
        "/v1/sessions/{session_id}": {
            "get": {
                "summary": "Where a session stands",
                "parameters": [_SESSION_ID],
                "responses": {
                    "200": {
                        "description": "The session",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Snapshot"}}
                        },
                    },
                    **_errors(401, 404, 429, 503),
                },
            }
        },
        "/v1/sessions/{session_id}/cancel": {
            "post": {
                "summary": "Cancel a session's pending agents",
                "parameters": [_SESSION_ID],
                "responses": {
                    "200": {
                        "description": "Cancelled: every pending agent got a final with result_code 4",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors(401, 404, 409, 429, 503),
                },
            }
        },
        "/v1/agents": {
            "get": {
                "summary": "Agents with live workers",
                "responses": {
                    "200": {
                        "description": "The WebSocket's `agents` frame",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors(401, 429, 503),
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}},
                    **_errors(401, 429),
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "appidHeader": {"type": "apiKey", "in": "header", "name": "X-Magi-Appid"},
            "tokenHeader": {"type": "apiKey", "in": "header", "name": "X-Magi-Token"},
            "appidQuery": {"type": "apiKey", "in": "query", "name": "appid"},
            "tokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "code"],
                "properties": {
                    "error": {"type": "string"},
                    "code": {"type": "string"},
                    "session_id": {"type": "string"},
                    "request_id": {"type": "string"},
                },
            },
            "Judgement": {
                "type": "object",
                "required": ["agent_ids", "data"],
                "properties": {
                    "agent_ids": {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": 1,
                        "maxItems": 16,
                    },
                    "data": {
                        "type": "object",
                        "required": ["user_input"],
                        "properties": {"user_input": {"type": "string"}},
                    },
                    "request_id": {"type": "string", "minLength": 1, "maxLength": 128},
                },
            },
            "Accepted": {
                "type": "object",
                "required": ["session_id", "seq"],
                "properties": {
                    "session_id": {"type": "string"},
                    "seq": {"type": "integer"},
                    "events": {"type": "string", "description": "Where to follow the session"},
                },
            },
            "Snapshot": {
                "type": "object",
                "properties": {
                    "session_id": {"type": "string"},
                    "agent_ids": {"type": "array", "items": {"type": "string"}},
                    "pending": {"type": "array", "items": {"type": "string"}},
                    "finals": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "properties": {
                                "result_code": {"type": "integer"},
                                "decision": {"enum": ["approve", "reject", "abstain"]},
                            },
                        },
                    },
                    "completed": {"type": "boolean"},
                    "verdict": {
                        "type": ["string", "null"],
                        "description": "Majority decision, once completed",
                    },
                    "last_seq": {"type": "integer"},
                },
            },
        },
    },
}
