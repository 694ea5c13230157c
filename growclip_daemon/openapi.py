"""OpenAPI descriptions of the routes whose bodies the handlers parse themselves.

The handlers read raw JSON (to bound its size and to answer every malformed body with a precise
OpenAI-style error), so FastAPI cannot derive their schemas; these fragments, passed as
``openapi_extra``, make ``GET /openapi.json`` describe the API truthfully for clients and for
schema-driven fuzzing.
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
        for s in statuses
    }


def _ok(schema: dict[str, Any]) -> dict[str, Any]:
    return {"200": {"description": "ok", "content": {"application/json": {"schema": schema}}}}


_IMAGE_ITEM = {
    "type": "object",
    "required": ["image"],
    "additionalProperties": False,
    "properties": {"image": {"type": "string", "description": "base64 or data URI of a PNG, JPEG or WebP"}},
}
_TOKENS = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "integer", "minimum": 0, "maximum": 255},
    "description": "ids of the byte tokenizer: the text's UTF-8 bytes",
}
_TEXT = {"type": "string", "minLength": 1}
_MODEL = {"type": "string", "description": "any name: the current model; growclip@N: a held generation"}

_EMBEDDINGS_REQUEST = {
    "type": "object",
    "required": ["input"],
    "additionalProperties": False,
    "properties": {
        "input": {
            "oneOf": [
                _TEXT,
                _TOKENS,
                {"type": "array", "minItems": 1, "items": {"oneOf": [_TEXT, _TOKENS, _IMAGE_ITEM]}},
            ]
        },
        "model": _MODEL,
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
        "user": {"type": "string"},
    },
}
_EMBEDDINGS_RESPONSE = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]
                    },
                },
            },
        },
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
        },
    },
}
_MODEL_CARD = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}

EMBEDDINGS: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _EMBEDDINGS_REQUEST}}},
    "responses": {**_ok(_EMBEDDINGS_RESPONSE), **_errors(400, 404, 413, 429, 503)},
}
RANK: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image", "texts"],
                    "additionalProperties": False,
                    "properties": {
                        "image": _IMAGE_ITEM["properties"]["image"],  # type: ignore[index]
                        "texts": {"type": "array", "minItems": 1, "items": _TEXT},
                        "model": _MODEL,
                    },
                }
            }
        },
    },
    "responses": {
        **_ok(
            {
                "type": "object",
                "required": ["object", "model", "scores", "probabilities"],
                "properties": {
                    "object": {"const": "rank"},
                    "model": {"type": "string"},
                    "scores": {"type": "array", "items": {"type": "number"}},
                    "probabilities": {"type": "array", "items": {"type": "number"}},
                },
            }
        ),
        **_errors(400, 404, 413, 429, 503),
    },
}
MODELS: dict[str, Any] = {
    "responses": {
        **_ok(
            {
                "type": "object",
                "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL_CARD}},
            }
        ),
        **_errors(503),
    }
}
MODEL: dict[str, Any] = {"responses": {**_ok(_MODEL_CARD), **_errors(404, 503)}}
MODEL_STATUS: dict[str, Any] = {"responses": {**_ok({"type": "object"}), **_errors(503)}}
ADMIN: dict[str, Any] = {
    "security": [{"bearer": []}],
    "responses": {**_ok({"type": "object"}), **_errors(401, 403, 409, 503)},
}
