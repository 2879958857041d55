"""`stack up --secure` without starting anything: the certificates, the broker's configuration, the
client properties files. The secured stack itself runs in tests/integration/test_secure_stack.py."""

from __future__ import annotations

import ipaddress
import io
import logging

import javaproperties
from confluent_kafka import Producer
from cryptography import x509

from fraudstream import stack_secure
from fraudstream.settings import Settings
from fraudstream.stack import INFRA, _render


def test_material_is_a_ca_and_a_certificate_for_the_loopback_address_signed_by_it(tmp_path):
    material = stack_secure.ensure_material(tmp_path / "secure")
    ca = x509.load_pem_x509_certificate(material.ca.read_bytes())
    chain = x509.load_pem_x509_certificates(material.cert.read_bytes())
    chain[0].verify_directly_issued_by(ca)
    names = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    client = x509.load_pem_x509_certificates(material.client_cert.read_bytes())
    client[0].verify_directly_issued_by(ca)  # the mutual-TLS listener trusts this CA alone
    usage = client[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage
    for private in (material.key, material.client_key, material.keystore, material.secrets_file, material.folder):
        assert private.stat().st_mode & 0o077 == 0, f"{private} is readable by others"
    # Made once: a second start keeps the same CA (clients that trust it keep working).
    assert stack_secure.ensure_material(material.folder).ca.read_bytes() == material.ca.read_bytes()


def test_a_folder_without_client_certificates_gets_them_and_keeps_its_passwords(tmp_path):
    """A stack made before mutual TLS: its Kafka data holds the SCRAM user made with the old password."""
    material = stack_secure.ensure_material(tmp_path / "secure")
    before = material.secrets()
    material.client_cert.unlink()
    again = stack_secure.ensure_material(material.folder)
    assert again.client_cert.is_file() and again.secrets() == before


PORTS = dict(
    kafka_port=1111,
    controller_port=2222,
    kafka_secure_port=3333,
    kafka_mtls_port=3334,
    kafka_jwt_port=3335,
    registry_port=5554,
    registry_secure_port=5555,
)


def secured_broker_config(tmp_path, material, **flags) -> dict[str, str]:
    base = _render(
        INFRA / "kafka-server.properties", {"KAFKA_PORT": 1111, "CONTROLLER_PORT": 2222, "DATA_DIR": tmp_path}
    )
    return javaproperties.loads(stack_secure.kafka_server_config(base, material, Settings(**PORTS), **flags))


def test_the_secured_broker_has_no_plaintext_listener_and_denies_what_no_acl_allows(tmp_path):
    material = stack_secure.ensure_material(tmp_path / "secure")
    config = secured_broker_config(tmp_path, material)
    assert config["listeners"].split(",") == [
        "INTERNAL://127.0.0.1:1111",
        "CONTROLLER://127.0.0.1:2222",
        "SASL_SSL://127.0.0.1:3333",
        "MTLS://127.0.0.1:3334",
    ]
    protocols = dict(item.split(":") for item in config["listener.security.protocol.map"].split(","))
    assert "PLAINTEXT" not in protocols.values() and "SASL_PLAINTEXT" not in protocols.values()
    assert config["inter.broker.listener.name"] == "INTERNAL" and protocols["INTERNAL"] == "SASL_SSL"
    assert protocols["CONTROLLER"] == "SASL_SSL" and config["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert config["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert config["allow.everyone.if.no.acl.found"] == "false" and config["super.users"] == "User:admin"
    # The unsecured JWT is off unless asked for, and then on a listener of its own.
    assert "OAUTHBEARER" not in "".join(config.values())
    jwt = secured_broker_config(tmp_path, material, unsecured_jwt=True)
    assert jwt["listeners"].endswith(",JWT://127.0.0.1:3335")
    assert jwt["listener.name.jwt.sasl.enabled.mechanisms"] == "OAUTHBEARER"
    assert jwt["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert config["listener.name.mtls.ssl.client.auth"] == "required"
    assert config["ssl.keystore.password"] == material.secrets()["keystore.password"]
    assert (
        f'password="{material.secrets()["admin.password"]}"' in config["listener.name.internal.plain.sasl.jaas.config"]
    )
    assert "${" not in "".join(config.values())


def test_each_role_gets_its_own_client_files_and_the_registry_its_users(tmp_path):
    material = stack_secure.ensure_material(tmp_path / "secure")
    stack_secure.write_client_properties(material, Settings(**PORTS))
    secrets = material.secrets()
    for role in stack_secure.ROLES:
        settings = Settings.from_env(
            {},
            kafka_config=material.kafka_client_properties(role),
            registry_config=material.registry_client_properties(role),
        )
        assert settings.bootstrap_servers == "127.0.0.1:3333"
        assert settings.kafka_extra["sasl.username"] == role
        assert settings.kafka_extra["sasl.password"] == secrets[f"{role}.password"]
        assert settings.schema_registry_url == "https://127.0.0.1:5555/apis/ccompat/v7"
        assert settings.registry_extra["basic.auth.user.info"] == f"{role}:{secrets[f'{role}.password']}"
        assert material.kafka_client_properties(role).stat().st_mode & 0o077 == 0
        assert material.registry_client_properties(role).stat().st_mode & 0o077 == 0
    admin = Settings.from_env({}, kafka_config=material.kafka_client_properties("admin"))
    assert admin.bootstrap_servers == "127.0.0.1:1111" and admin.kafka_extra["sasl.mechanisms"] == "PLAIN"
    mtls = Settings.from_env({}, kafka_config=material.kafka_mtls_client_properties)
    assert mtls.bootstrap_servers == "127.0.0.1:3334" and mtls.kafka_extra["security.protocol"] == "SSL"
    assert not material.kafka_jwt_client_properties.exists()  # only with --unsecured-jwt

    registry = stack_secure.registry_config(material, Settings(**PORTS), "127.0.0.1:3333")
    assert registry["quarkus.http.insecure-requests"] == "disabled"
    assert registry["apicurio.auth.role-based-authorization"] == "true"
    assert registry["apicurio.auth.anonymous-read-access.enabled"] == "false"
    assert registry["quarkus.security.users.embedded.roles.admin"] == "sr-admin"
    assert all(
        registry[f"quarkus.security.users.embedded.roles.{role}"] == "sr-readonly" for role in stack_secure.ROLES
    )
    assert registry["apicurio.kafkasql.producer.sasl.mechanism"] == "SCRAM-SHA-512"


def test_librdkafka_logs_its_configuration_with_secrets_redacted():
    """Our clients log through Python logging; librdkafka itself masks sensitive properties."""
    stream = io.StringIO()
    logger = logging.getLogger("test.librdkafka.redaction")
    logger.addHandler(logging.StreamHandler(stream))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    Producer(
        {"debug": "conf", "sasl.password": "Pass-In-Logs-1", "ssl.key.password": "Key-Pass-2", "logger": logger}
    ).flush(1)
    logged = stream.getvalue()
    assert "sasl.password = [redacted]" in logged
    assert "Pass-In-Logs-1" not in logged and "Key-Pass-2" not in logged
