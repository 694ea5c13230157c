"""kafka.security: kafka-python's TLS/SASL keys validated at load, secrets only from the environment."""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from growclip_daemon.config import ConfigError, load_config
from growclip_stream.data.kafka_security import accepted, client_options


def test_accepted_keys_are_kafka_pythons_own_for_every_client() -> None:
    for key in accepted() - {"sasl_plain_password_env", "ssl_password_env"}:
        for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
            assert key in client.DEFAULT_CONFIG, (key, client)
    assert {"security_protocol", "sasl_mechanism", "sasl_plain_username", "ssl_cafile"} <= accepted()


def test_security_settings_load_and_secrets_come_from_the_environment(tmp_path) -> None:
    cfg = load_config(
        None,
        [
            "kafka.security.security_protocol=SASL_SSL",
            "kafka.security.sasl_mechanism=SCRAM-SHA-512",
            "kafka.security.sasl_plain_username=growclip",
            "kafka.security.sasl_plain_password_env=KAFKA_PASSWORD",
            f"kafka.security.ssl_cafile={tmp_path / 'ca.pem'}",
        ],
    )
    opts = client_options(cfg.kafka.security, {"KAFKA_PASSWORD": "s3cret"})
    assert opts == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "growclip",
        "sasl_plain_password": "s3cret",
        "ssl_cafile": str(tmp_path / "ca.pem"),
    }
    with pytest.raises(ValueError, match="environment variable KAFKA_PASSWORD is not set"):
        client_options(cfg.kafka.security, {})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("kafka.security.sasl_plain_password=hunter2", "give sasl_plain_password_env"),
        ("kafka.security.bootstrap_servers=x:1", "bootstrap_servers: not a kafka-python security setting"),
        ("kafka.security.ssl_context=x", "ssl_context: not a kafka-python security setting"),
        ("kafka.security.security_protocol=TLS", "security_protocol: must be one of"),
    ],
)
def test_bad_security_settings_are_refused_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "kafka.security" in str(err.value)


def test_security_does_not_apply_to_the_embedded_broker() -> None:
    with pytest.raises(ConfigError, match="embedded broker is plaintext"):
        load_config(None, ["kafka.embedded=true", "kafka.security.security_protocol=SSL"])
