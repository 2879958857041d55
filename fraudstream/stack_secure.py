"""`fraudstream stack up --secure`: TLS and SASL on the local stack.

At first start a CA is generated with the `cryptography` package and signs two certificates: the
server's, for 127.0.0.1/localhost, and one client certificate for mutual TLS. The CA's private key is
then dropped: nothing else is ever signed. A random password is made for the SCRAM-SHA-512 user that
`kafka-storage format --add-scram` creates. Kafka gets two listeners: SASL_SSL (SCRAM-SHA-512, and
OAUTHBEARER with Kafka's unsecured-JWT validator, which only checks a token's form, lifetime and
required scope: for tests, never for production) and SSL that demands a client certificate. Everything
lives in <stack_dir>/secure, private files readable by their owner only; so do the client properties
files, one per way in, that point our commands, or any librdkafka or confluent-kafka client, at the
secured endpoints.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import javaproperties

from fraudstream.errors import StackError
from fraudstream.resources import resource_dir
from fraudstream.settings import APICURIO_CCOMPAT_PATH

SECURE_TEMPLATE = resource_dir("infra") / "kafka-secure.properties"
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_USER = "fraudstream"
# The unsecured-JWT validator accepts any well-formed, unexpired token carrying this scope.
OAUTH_SCOPE = "fraudstream.pipeline"
MTLS_CLIENT = "fraudstream-client"  # the client certificate's CN: the principal User:CN=fraudstream-client
HOST = "127.0.0.1"
CERT_DAYS = 825  # the longest validity TLS clients commonly accept for a server certificate


@dataclass(frozen=True, slots=True)
class SecureMaterial:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.folder / "broker-cert.pem"

    @property
    def key(self) -> Path:
        return self.folder / "broker-key.pem"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client-cert.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client-key.pem"

    @property
    def keystore(self) -> Path:
        return self.folder / "broker.p12"

    @property
    def secrets_file(self) -> Path:
        return self.folder / "secrets.properties"

    @property
    def kafka_client_properties(self) -> Path:
        return self.folder / "kafka-client.properties"

    @property
    def kafka_mtls_client_properties(self) -> Path:
        return self.folder / "kafka-client-mtls.properties"

    @property
    def kafka_oauthbearer_client_properties(self) -> Path:
        return self.folder / "kafka-client-oauthbearer.properties"

    @property
    def registry_client_properties(self) -> Path:
        return self.folder / "registry-client.properties"

    def secrets(self) -> dict[str, str]:
        with open(self.secrets_file, encoding="utf-8") as f:
            return dict(javaproperties.load(f))

    @property
    def exists(self) -> bool:
        return all(p.is_file() for p in (self.ca, self.cert, self.key, self.client_cert, self.client_key,
                                         self.keystore, self.secrets_file))


def ensure_material(folder: Path) -> SecureMaterial:
    """The CA, the server and client certificates, the server's PKCS12 key store and the passwords, made once.

    Certificates missing from an older folder are made again under a new CA; the passwords already in
    it are kept, since Kafka's data holds the SCRAM user made with them."""
    material = SecureMaterial(folder)
    if material.exists:
        return material
    kept = material.secrets() if material.secrets_file.is_file() else {}
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import pkcs12
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise StackError("`stack up --secure` needs the cryptography package: pip install 'fraudstream[stack]'") from None

    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=CERT_DAYS)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fraudstream local CA {secrets.token_hex(4)}")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def signed_by_ca(common_name: str, usage, *extensions) -> tuple:
        """A new key and its certificate for `common_name`, signed by the CA, for one extended key usage."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    key, cert = signed_by_ca(HOST, ExtendedKeyUsageOID.SERVER_AUTH, x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]))
    client_key, client_cert = signed_by_ca(MTLS_CLIENT, ExtendedKeyUsageOID.CLIENT_AUTH)
    keystore_password = kept.get("keystore.password") or secrets.token_urlsafe(18)
    pem = serialization.Encoding.PEM
    _write(material.ca, ca_cert.public_bytes(pem), private=False)
    _write(material.cert, cert.public_bytes(pem) + ca_cert.public_bytes(pem), private=False)
    _write(material.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
           private=True)
    _write(material.client_cert, client_cert.public_bytes(pem) + ca_cert.public_bytes(pem), private=False)
    _write(material.client_key, client_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()), private=True)
    _write(material.keystore, pkcs12.serialize_key_and_certificates(
        b"broker", key, cert, [ca_cert], serialization.BestAvailableEncryption(keystore_password.encode())),
        private=True)
    # Written last: its presence means the rest is complete.
    _write(material.secrets_file, javaproperties.dumps({
        "keystore.password": keystore_password,
        "scram.user": SCRAM_USER,
        "scram.password": kept.get("scram.password") or secrets.token_urlsafe(18),
    }, timestamp=False).encode(), private=True)
    return material


def scram_format_arguments(material: SecureMaterial) -> list[str]:
    """kafka-storage format's arguments that create the SCRAM user in the new cluster's metadata."""
    s = material.secrets()
    return ["--add-scram", f"{SCRAM_MECHANISM}=[name={s['scram.user']},password={s['scram.password']}]"]


def kafka_server_config(base: str, material: SecureMaterial, port: int, mtls_port: int) -> str:
    """The broker's rendered configuration with the SASL_SSL and mutual-TLS (MTLS) listeners added."""
    listeners = f"SASL_SSL://{HOST}:{port},MTLS://{HOST}:{mtls_port}"
    additions = {"listeners": listeners, "advertised.listeners": listeners,
                 "listener.security.protocol.map": "SASL_SSL:SASL_SSL,MTLS:SSL"}
    lines = []
    for line in base.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in additions:
            line = f"{key}={value.strip()},{additions.pop(key.strip())}"
        lines.append(line)
    if additions:
        raise StackError(f"the broker template has no {', '.join(additions)} line to add the secured listeners to")
    extra = SECURE_TEMPLATE.read_text()
    for name, value in {"KEYSTORE": material.keystore, "KEYSTORE_PASSWORD": material.secrets()["keystore.password"],
                        "CA": material.ca, "OAUTH_SCOPE": OAUTH_SCOPE}.items():
        extra = extra.replace("${" + name + "}", str(value))
    return "\n".join(lines) + "\n\n" + extra


def registry_system_properties(material: SecureMaterial, port: int) -> dict[str, object]:
    """Quarkus TLS for the registry: HTTPS on `port` with the stack's certificate (plain HTTP stays)."""
    return {
        "quarkus.http.ssl-port": port,
        "quarkus.tls.key-store.pem.0.cert": material.cert,
        "quarkus.tls.key-store.pem.0.key": material.key,
    }


def write_client_properties(material: SecureMaterial, kafka_port: int, mtls_port: int, registry_port: int) -> None:
    """Properties files for clients of the secured endpoints (rewritten at each start: ports may change)."""
    s = material.secrets()
    ca = str(material.ca)
    sasl_ssl = {"bootstrap.servers": f"{HOST}:{kafka_port}", "security.protocol": "SASL_SSL", "ssl.ca.location": ca}
    files = {
        material.kafka_client_properties: sasl_ssl | {
            "sasl.mechanisms": SCRAM_MECHANISM, "sasl.username": s["scram.user"], "sasl.password": s["scram.password"]},
        # librdkafka makes the unsecured JWT itself from sasl.oauthbearer.config.
        material.kafka_oauthbearer_client_properties: sasl_ssl | {
            "sasl.mechanisms": "OAUTHBEARER", "enable.sasl.oauthbearer.unsecure.jwt": "true",
            "sasl.oauthbearer.config": f"principal={SCRAM_USER} scope={OAUTH_SCOPE}"},
        material.kafka_mtls_client_properties: {
            "bootstrap.servers": f"{HOST}:{mtls_port}", "security.protocol": "SSL", "ssl.ca.location": ca,
            "ssl.certificate.location": str(material.client_cert), "ssl.key.location": str(material.client_key)},
    }
    header = "Written by `fraudstream stack up --secure`; rewritten at each start."
    for path, properties in files.items():
        _write(path, javaproperties.dumps(properties, comments=header, timestamp=False).encode(), private=True)
    registry = {"url": registry_https_url(registry_port), "ssl.ca.location": ca}
    _write(material.registry_client_properties,
           javaproperties.dumps(registry, comments=header, timestamp=False).encode(), private=False)


def registry_https_url(port: int) -> str:
    return f"https://{HOST}:{port}{APICURIO_CCOMPAT_PATH}"


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Create the file with its final mode: a private file is never readable by others, even briefly."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
