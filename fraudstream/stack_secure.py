"""`fraudstream stack up --secure`: TLS, SASL and authorization on a stack of its own.

At first start a CA is generated with the `cryptography` package and signs the server's certificate (for
127.0.0.1/localhost) and one client certificate for mutual TLS (CN=producer). The CA's private key is then
dropped: nothing else is ever signed. Random passwords are made for the admin and for each role of
fraudstream.acl (plus the registry's own storage connection).

The secured broker has no PLAINTEXT listener at all (nothing bypasses authentication):
- INTERNAL (SASL_SSL, PLAIN, the admin alone, from server.properties): inter-broker and the stack's own
  admin calls; CONTROLLER (SASL_SSL, PLAIN, the admin alone): KRaft's controller.
- SASL_SSL (SCRAM-SHA-512): one user per role, created after start with the admin API (so no password is
  on a command line), each with the least ACLs its role needs (fraudstream.acl).
- MTLS (TLS, client certificate required): the principal is the certificate's CN (User:producer).
- JWT (SASL_SSL, OAUTHBEARER with Kafka's unsecured-JWT validator, which checks a token's form, lifetime
  and scope but not its signature, so a client can name itself anyone): only with --unsecured-jwt, on its
  own port; the principal it names still has only the ACLs given to that name.
StandardAuthorizer with allow.everyone.if.no.acl.found=false: no ACL, no access; User:admin is the only
super user.

The registry's plain HTTP is closed; its HTTPS port authenticates every request with HTTP Basic against
Quarkus' embedded users (built into Apicurio 3.3, configured at run time), and Apicurio's role-based
authorization gives the admin sr-admin and every role sr-readonly (read schemas, look them up, check
compatibility; never register). Apicurio switches authentication on only with an OIDC tenant, so one is
configured that points nowhere: no bearer token is ever accepted (a real deployment points it at its
identity provider, see docs/how-to/local-stack.md).
Everything lives in <stack_dir>/secure, created private before anything is written to it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import javaproperties

from fraudstream.acl import ROLES as ROLE_DESCRIPTIONS
from fraudstream.errors import StackError
from fraudstream.resources import resource_dir
from fraudstream.settings import APICURIO_CCOMPAT_PATH

SECURE_TEMPLATE = resource_dir("infra") / "kafka-secure.properties"
SCRAM_MECHANISM = "SCRAM-SHA-512"
ADMIN = "admin"  # the one super user (PLAIN on the INTERNAL and CONTROLLER listeners)
ROLES = tuple(ROLE_DESCRIPTIONS)  # one SCRAM user and one pair of client files per role
REGISTRY_STORAGE_USER = "registry"  # the registry's kafkasql connection (ACLs: registry_storage_grants)
# The registry's storage topics and consumer groups all start with this on the secured stack.
REGISTRY_STORAGE_PREFIX = "fraudstream-registry."
# The unsecured-JWT validator accepts any well-formed, unexpired token carrying this scope.
OAUTH_SCOPE = "fraudstream.pipeline"
MTLS_CLIENT = "producer"  # the client certificate's CN; the MTLS listener maps it to the principal User:producer
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

    def kafka_client_properties(self, role: str) -> Path:
        """A role's (or the admin's) Kafka client properties: SASL_SSL with its SCRAM user (the admin: INTERNAL)."""
        return self.folder / f"kafka-client-{role}.properties"

    def registry_client_properties(self, role: str) -> Path:
        """A role's (or the admin's) registry client properties: the HTTPS URL, its CA, basic.auth.user.info."""
        return self.folder / f"registry-client-{role}.properties"

    @property
    def kafka_mtls_client_properties(self) -> Path:
        return self.folder / "kafka-client-mtls.properties"

    @property
    def kafka_jwt_client_properties(self) -> Path:
        return self.folder / "kafka-client-unsecured-jwt.properties"

    def secrets(self) -> dict[str, str]:
        with open(self.secrets_file, encoding="utf-8") as f:
            return dict(javaproperties.load(f))

    @property
    def exists(self) -> bool:
        return all(
            p.is_file()
            for p in (self.ca, self.cert, self.key, self.client_cert, self.client_key, self.keystore, self.secrets_file)
        )


def ensure_material(folder: Path) -> SecureMaterial:
    """The CA, the server and client certificates, the server's PKCS12 key store and the passwords, made once.

    Certificates missing from an older folder are made again under a new CA; the passwords already in
    it are kept, since Kafka's data holds the SCRAM users made with them."""
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
        raise StackError(
            "`stack up --secure` needs the cryptography package: pip install 'fraudstream[stack]'"
        ) from None

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # an existing folder too
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=CERT_DAYS)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fraudstream local CA {secrets.token_hex(4)}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def signed_by_ca(common_name: str, usage, *extensions) -> tuple:
        """A new key and its certificate for `common_name`, signed by the CA, for one extended key usage."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    key, cert = signed_by_ca(
        HOST,
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
    )
    client_key, client_cert = signed_by_ca(MTLS_CLIENT, ExtendedKeyUsageOID.CLIENT_AUTH)
    keystore_password = kept.get("keystore.password") or secrets.token_urlsafe(18)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    _write(material.ca, ca_cert.public_bytes(pem), private=False)
    _write(material.cert, cert.public_bytes(pem) + ca_cert.public_bytes(pem), private=False)
    _write(material.key, key.private_bytes(pem, pkcs8, serialization.NoEncryption()), private=True)
    _write(material.client_cert, client_cert.public_bytes(pem) + ca_cert.public_bytes(pem), private=False)
    _write(material.client_key, client_key.private_bytes(pem, pkcs8, serialization.NoEncryption()), private=True)
    _write(
        material.keystore,
        pkcs12.serialize_key_and_certificates(
            b"broker", key, cert, [ca_cert], serialization.BestAvailableEncryption(keystore_password.encode())
        ),
        private=True,
    )
    passwords = {
        f"{user}.password": kept.get(f"{user}.password") or secrets.token_urlsafe(18)
        for user in (ADMIN, *ROLES, REGISTRY_STORAGE_USER)
    }
    # Written last: its presence means the rest is complete.
    _write(
        material.secrets_file,
        javaproperties.dumps({"keystore.password": keystore_password, **passwords}, timestamp=False).encode(),
        private=True,
    )
    return material


def kafka_server_config(base: str, material: SecureMaterial, settings, *, unsecured_jwt: bool = False) -> str:
    """The broker's configuration for the secured stack: the base template's listeners replaced (no PLAINTEXT
    left), TLS, SASL and the authorizer added from kafka-secure.properties."""
    s = settings
    listeners = {
        "INTERNAL": (s.kafka_port, "SASL_SSL"),
        "CONTROLLER": (s.controller_port, "SASL_SSL"),
        "SASL_SSL": (s.kafka_secure_port, "SASL_SSL"),
        "MTLS": (s.kafka_mtls_port, "SSL"),
    }
    if unsecured_jwt:
        listeners["JWT"] = (s.kafka_jwt_port, "SASL_SSL")
    advertised = ",".join(f"{name}://{HOST}:{port}" for name, (port, _) in listeners.items() if name != "CONTROLLER")
    replaced = {
        "listeners": ",".join(f"{name}://{HOST}:{port}" for name, (port, _) in listeners.items()),
        "advertised.listeners": advertised,
        "listener.security.protocol.map": ",".join(f"{name}:{protocol}" for name, (_, protocol) in listeners.items()),
        "inter.broker.listener.name": "INTERNAL",
    }
    lines = []
    for line in base.splitlines():
        key, sep, _ = line.partition("=")
        if sep and key.strip() in replaced:
            line = f"{key.strip()}={replaced.pop(key.strip())}"
        lines.append(line)
    if replaced:
        raise StackError(f"the broker template has no {', '.join(replaced)} line to secure")
    secret = material.secrets()
    extra = SECURE_TEMPLATE.read_text()
    for name, value in {
        "KEYSTORE": material.keystore,
        "KEYSTORE_PASSWORD": secret["keystore.password"],
        "CA": material.ca,
        "ADMIN": ADMIN,
        "ADMIN_PASSWORD": secret[f"{ADMIN}.password"],
    }.items():
        extra = extra.replace("${" + name + "}", str(value))
    if unsecured_jwt:
        extra += (
            "\n# --unsecured-jwt: OAUTHBEARER with Kafka's unsecured-JWT validator on a listener of its own (tests only).\n"
            "listener.name.jwt.sasl.enabled.mechanisms=OAUTHBEARER\n"
            "listener.name.jwt.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer."
            f'OAuthBearerLoginModule required unsecuredLoginStringClaim_sub="{ADMIN}" '
            f'unsecuredValidatorRequiredScope="{OAUTH_SCOPE}";\n'
        )
    return "\n".join(lines) + "\n\n" + extra


REGISTRY_ADMIN_ROLE, REGISTRY_READ_ROLE = "sr-admin", "sr-readonly"  # Apicurio's default role names


def registry_config(material: SecureMaterial, settings, bootstrap_servers: str) -> dict[str, object]:
    """The registry's secured configuration: HTTPS only on registry_secure_port (plain HTTP closed), HTTP
    Basic users with roles, and its storage connection as REGISTRY_STORAGE_USER over SCRAM. Holds passwords:
    the stack writes it to the registry's private config/application.properties, never to its command line."""
    secret = material.secrets()
    jaas = (
        f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{REGISTRY_STORAGE_USER}" '
        f'password="{secret[f"{REGISTRY_STORAGE_USER}.password"]}";'
    )
    kafka_client = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": SCRAM_MECHANISM,
        "sasl.jaas.config": jaas,
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(material.ca),
    }
    props: dict[str, object] = {
        "quarkus.http.insecure-requests": "disabled",
        "quarkus.http.ssl-port": settings.registry_secure_port,
        "quarkus.tls.key-store.pem.0.cert": material.cert,
        "quarkus.tls.key-store.pem.0.key": material.key,
        # Authentication on: Apicurio turns it on with an OIDC tenant; this one points nowhere (no token is
        # accepted), and HTTP Basic is checked against the embedded users below.
        "quarkus.oidc.tenant-enabled": "true",
        "quarkus.oidc.auth-server-url": f"https://{HOST}:1/no-identity-provider",
        "quarkus.oidc.discovery-enabled": "false",
        "quarkus.oidc.jwks-path": f"https://{HOST}:1/no-identity-provider/jwks",
        "quarkus.http.auth.basic": "true",
        "quarkus.security.users.embedded.plain-text": "true",  # this file is private, like secrets.properties
        "apicurio.auth.role-based-authorization": "true",
        "apicurio.auth.role-source": "token",
        "apicurio.auth.anonymous-read-access.enabled": "false",
        "apicurio.kafkasql.bootstrap.servers": bootstrap_servers,
        "apicurio.kafkasql.security.protocol": "SASL_SSL",
        "apicurio.kafkasql.topic": f"{REGISTRY_STORAGE_PREFIX}kafkasql-journal",
        "apicurio.kafkasql.snapshots.topic": f"{REGISTRY_STORAGE_PREFIX}kafkasql-snapshots",
        "apicurio.events.kafka.topic": f"{REGISTRY_STORAGE_PREFIX}registry-events",
        "apicurio.kafkasql.consumer.group-prefix": REGISTRY_STORAGE_PREFIX,
    }
    for user, (password, role) in registry_users(material).items():
        props[f"quarkus.security.users.embedded.users.{user}"] = password
        props[f"quarkus.security.users.embedded.roles.{user}"] = role
    for client in ("producer", "consumer", "admin"):
        props |= {f"apicurio.kafkasql.{client}.{key}": value for key, value in kafka_client.items()}
    return props


def registry_users(material: SecureMaterial) -> dict[str, tuple[str, str]]:
    """The registry's users: user -> (password, role). The admin registers schemas; every role reads them."""
    secret = material.secrets()
    return {
        user: (secret[f"{user}.password"], REGISTRY_ADMIN_ROLE if user == ADMIN else REGISTRY_READ_ROLE)
        for user in (ADMIN, *ROLES)
    }


def registry_storage_bindings() -> list:
    """The registry's storage principal: its own topics and groups (prefixed), nothing else."""
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    principal = f"User:{REGISTRY_STORAGE_USER}"
    topic_ops = (
        AclOperation.READ,
        AclOperation.WRITE,
        AclOperation.DESCRIBE,
        AclOperation.CREATE,
        AclOperation.DESCRIBE_CONFIGS,
    )
    bindings = [
        AclBinding(
            ResourceType.TOPIC,
            REGISTRY_STORAGE_PREFIX,
            ResourcePatternType.PREFIXED,
            principal,
            "*",
            op,
            AclPermissionType.ALLOW,
        )
        for op in topic_ops
    ]
    bindings += [
        AclBinding(
            ResourceType.GROUP,
            REGISTRY_STORAGE_PREFIX,
            ResourcePatternType.PREFIXED,
            principal,
            "*",
            op,
            AclPermissionType.ALLOW,
        )
        for op in (AclOperation.READ, AclOperation.DESCRIBE)
    ]
    # Its admin client lists the cluster's topics and checks their configs.
    bindings.append(
        AclBinding(
            ResourceType.BROKER,
            "kafka-cluster",
            ResourcePatternType.LITERAL,
            principal,
            "*",
            AclOperation.DESCRIBE,
            AclPermissionType.ALLOW,
        )
    )
    return bindings


def create_scram_users(material: SecureMaterial, admin_client) -> None:
    """Each role's SCRAM user (and the registry's), through the admin API: no password on a command line."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    secret = material.secrets()
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    upserts = [
        UserScramCredentialUpsertion(user, info, secret[f"{user}.password"].encode())
        for user in (*ROLES, REGISTRY_STORAGE_USER)
    ]
    for user, future in admin_client.alter_user_scram_credentials(upserts, request_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            raise StackError(f"could not create the SCRAM user {user}: {exc.args[0].str()}") from None


def admin_kafka_properties(material: SecureMaterial, settings) -> dict[str, str]:
    """The admin's client properties: PLAIN over TLS on the INTERNAL listener."""
    return {
        "bootstrap.servers": f"{HOST}:{settings.kafka_port}",
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": str(material.ca),
        "sasl.mechanisms": "PLAIN",
        "sasl.username": ADMIN,
        "sasl.password": material.secrets()[f"{ADMIN}.password"],
    }


def write_client_properties(material: SecureMaterial, settings, *, unsecured_jwt: bool = False) -> None:
    """Properties files for each role and the admin (rewritten at each start: ports may change)."""
    secret = material.secrets()
    ca = str(material.ca)
    sasl_ssl = {
        "bootstrap.servers": f"{HOST}:{settings.kafka_secure_port}",
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": ca,
        "sasl.mechanisms": SCRAM_MECHANISM,
    }
    files = {material.kafka_client_properties(ADMIN): admin_kafka_properties(material, settings)}
    files |= {
        material.kafka_client_properties(role): sasl_ssl
        | {"sasl.username": role, "sasl.password": secret[f"{role}.password"]}
        for role in ROLES
    }
    files[material.kafka_mtls_client_properties] = {
        "bootstrap.servers": f"{HOST}:{settings.kafka_mtls_port}",
        "security.protocol": "SSL",
        "ssl.ca.location": ca,
        "ssl.certificate.location": str(material.client_cert),
        "ssl.key.location": str(material.client_key),
    }
    if unsecured_jwt:  # librdkafka makes the unsecured JWT itself from sasl.oauthbearer.config
        files[material.kafka_jwt_client_properties] = {
            "bootstrap.servers": f"{HOST}:{settings.kafka_jwt_port}",
            "security.protocol": "SASL_SSL",
            "ssl.ca.location": ca,
            "sasl.mechanisms": "OAUTHBEARER",
            "enable.sasl.oauthbearer.unsecure.jwt": "true",
            "sasl.oauthbearer.config": f"principal=producer scope={OAUTH_SCOPE}",
        }
    url = registry_https_url(settings.registry_secure_port)
    for user in (ADMIN, *ROLES):
        files[material.registry_client_properties(user)] = {
            "url": url,
            "ssl.ca.location": ca,
            "basic.auth.user.info": f"{user}:{secret[f'{user}.password']}",
        }
    header = "Written by `fraudstream stack up --secure`; rewritten at each start."
    for path, properties in files.items():
        write_private(path, javaproperties.dumps(properties, comments=header, timestamp=False).encode())


def registry_https_url(port: int) -> str:
    return f"https://{HOST}:{port}{APICURIO_CCOMPAT_PATH}"


def write_private(path: Path, data: bytes) -> None:
    _write(path, data, private=True)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Create the file with its final mode: a private file is never readable by others, even briefly."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover could have another mode; O_CREAT keeps an existing file's
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
