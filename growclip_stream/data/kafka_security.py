"""Security settings for a real Kafka cluster (TLS, SASL), passed through to every kafka-python client.

The daemon's consumer, its dead-letter and demo producers and its admin client (topic creation) all
connect to the same cluster, so they take the same options. Only kafka-python's own security keys
are accepted, and only those that take plain values (a YAML file cannot hold an ``ssl_context`` or
a token provider object). Secrets never sit in the config file: ``sasl_plain_password`` and
``ssl_password`` are given as ``<key>_env``, the name of an environment variable that holds them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

_CLIENT_KEYS = (
    set(KafkaConsumer.DEFAULT_CONFIG)
    & set(KafkaProducer.DEFAULT_CONFIG)
    & set(KafkaAdminClient.DEFAULT_CONFIG)
)
_OBJECT_KEYS = frozenset({"ssl_context", "sasl_oauth_token_provider"})  # objects, not config values
SECRET_KEYS = frozenset({"sasl_plain_password", "ssl_password"})  # only through <key>_env
# kafka-python's security keys that all three clients accept and that take plain values
SECURITY_KEYS = frozenset(
    k for k in _CLIENT_KEYS if k.startswith(("security_", "ssl_", "sasl_")) and k not in _OBJECT_KEYS
)
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


def check_security(options: Mapping[str, Any]) -> None:
    """Raises ValueError naming every key kafka-python would not take (or that holds a secret inline)."""
    errors = []
    for key, value in options.items():
        if key in SECRET_KEYS:
            errors.append(f"{key}: secrets are not written in the config; give {key}_env, the name of "
                          "an environment variable that holds it")  # fmt: skip
        elif key.endswith("_env") and key[: -len("_env")] in SECRET_KEYS:
            if not isinstance(value, str) or not value:
                errors.append(f"{key}: must name an environment variable")
        elif key not in SECURITY_KEYS:
            errors.append(
                f"{key}: not a kafka-python security setting; accepted: {', '.join(sorted(accepted()))}"
            )
        elif key == "security_protocol" and value not in SECURITY_PROTOCOLS:
            errors.append(f"security_protocol: must be one of {', '.join(SECURITY_PROTOCOLS)}, got {value!r}")
        elif isinstance(value, dict | list):
            errors.append(f"{key}: must be a single value")
    if errors:
        raise ValueError("; ".join(errors))


def accepted() -> set[str]:
    """Every key ``check_security`` takes."""
    return (set(SECURITY_KEYS) - SECRET_KEYS) | {f"{k}_env" for k in SECRET_KEYS}


def client_options(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The keyword arguments for kafka-python's clients: secrets read from their environment variables.

    Raises ValueError when a named variable is not set (the daemon cannot connect without it).
    """
    check_security(options)
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key.endswith("_env"):
            name = key[: -len("_env")]
            if value not in env:
                raise ValueError(f"kafka.security.{key}: environment variable {value} is not set")
            out[name] = env[value]
        else:
            out[key] = value
    return out
