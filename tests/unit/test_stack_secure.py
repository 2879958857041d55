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


def test_the_broker_gets_sasl_ssl_and_mutual_tls_listeners_next_to_its_own(tmp_path):
    material = stack_secure.ensure_material(tmp_path / "secure")
    base = _render(INFRA / "kafka-server.properties",
                   {"KAFKA_PORT": 1111, "CONTROLLER_PORT": 2222, "DATA_DIR": tmp_path})
    config = javaproperties.loads(stack_secure.kafka_server_config(base, material, 3333, 3334))
    assert config["listeners"].split(",") == ["PLAINTEXT://127.0.0.1:1111", "CONTROLLER://127.0.0.1:2222",
                                              "SASL_SSL://127.0.0.1:3333", "MTLS://127.0.0.1:3334"]
    assert config["advertised.listeners"].endswith(",SASL_SSL://127.0.0.1:3333,MTLS://127.0.0.1:3334")
    assert {"SASL_SSL:SASL_SSL", "MTLS:SSL"} <= set(config["listener.security.protocol.map"].split(","))
    assert config["sasl.enabled.mechanisms"] == "SCRAM-SHA-512,OAUTHBEARER"
    assert f'unsecuredValidatorRequiredScope="{stack_secure.OAUTH_SCOPE}"' in \
        config["listener.name.sasl_ssl.oauthbearer.sasl.jaas.config"]
    assert config["listener.name.mtls.ssl.client.auth"] == "required"
    assert config["listener.name.mtls.ssl.truststore.location"] == str(material.ca)
    assert config["listener.name.sasl_ssl.ssl.keystore.location"] == str(material.keystore)
    assert config["listener.name.sasl_ssl.ssl.keystore.password"] == material.secrets()["keystore.password"]
    assert "${" not in "".join(config.values())
    arguments = stack_secure.scram_format_arguments(material)
    assert arguments[0] == "--add-scram" and arguments[1].startswith("SCRAM-SHA-512=[name=fraudstream,password=")


def test_the_client_files_make_valid_settings_for_the_secured_endpoints(tmp_path):
    material = stack_secure.ensure_material(tmp_path / "secure")
    stack_secure.write_client_properties(material, 4444, 4445, 5555)
    settings = Settings.from_env({}, kafka_config=material.kafka_client_properties,
                                 registry_config=material.registry_client_properties)
    assert settings.bootstrap_servers == "127.0.0.1:4444"
    assert settings.schema_registry_url == "https://127.0.0.1:5555/apis/ccompat/v7"
    assert settings.kafka_extra["sasl.password"] == material.secrets()["scram.password"]
    assert settings.registry_client_conf()["ssl.ca.location"] == str(material.ca)
    assert material.kafka_client_properties.stat().st_mode & 0o077 == 0
    oauth = Settings.from_env({}, kafka_config=material.kafka_oauthbearer_client_properties)
    assert oauth.bootstrap_servers == "127.0.0.1:4444" and oauth.kafka_extra["sasl.mechanisms"] == "OAUTHBEARER"
    mtls = Settings.from_env({}, kafka_config=material.kafka_mtls_client_properties)
    assert mtls.bootstrap_servers == "127.0.0.1:4445" and mtls.kafka_extra["security.protocol"] == "SSL"
    assert mtls.kafka_extra["ssl.certificate.location"] == str(material.client_cert)


def test_librdkafka_logs_its_configuration_with_secrets_redacted():
    """Our clients log through Python logging; librdkafka itself masks sensitive properties."""
    stream = io.StringIO()
    logger = logging.getLogger("test.librdkafka.redaction")
    logger.addHandler(logging.StreamHandler(stream))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    Producer({"debug": "conf", "sasl.password": "Pass-In-Logs-1", "ssl.key.password": "Key-Pass-2",
              "logger": logger}).flush(1)
    logged = stream.getvalue()
    assert "sasl.password = [redacted]" in logged
    assert "Pass-In-Logs-1" not in logged and "Key-Pass-2" not in logged
