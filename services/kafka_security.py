"""How every Kafka client here encrypts and authenticates: one `KafkaSecurity`, read once per
process from the PGKD_KAFKA_* variables, and the shape each client library wants it in: FastStream's
KafkaBroker (the services, `pgkd submit`), aiokafka's client (the bootstrap probe) and kafka-python's
admin client and producer (`pgkd topics create`, `pgkd send`).

| variable | meaning |
|---|---|
| PGKD_KAFKA_SECURITY_PROTOCOL | PLAINTEXT (default), SSL, SASL_PLAINTEXT or SASL_SSL |
| PGKD_KAFKA_CA_FILE | PEM bundle of the CA that signed the brokers' certificates (else the system's) |
| PGKD_KAFKA_CERT_FILE, PGKD_KAFKA_KEY_FILE | a client certificate and its key, for TLS client authentication |
| PGKD_KAFKA_SASL_MECHANISM | PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 |
| PGKD_KAFKA_SASL_USERNAME | the SASL user |
| PGKD_KAFKA_SASL_PASSWORD or PGKD_KAFKA_SASL_PASSWORD_FILE | its password, inline or in a mounted file |

The variables are pgkd.settings.KafkaSecuritySettings (`pgkd settings` lists them), which checks each
one; the checks across them are here. A bad setting is a UserError naming the variable, raised when the
settings are read, so a service fails at start and a command before any work. The password is kept
out of repr/str and of every message raised here.
"""
from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from pgkd.errors import UserError
from pgkd.settings import KAFKA_PROTOCOLS, SASL_MECHANISMS, KafkaSecuritySettings, read

PROTOCOLS, MECHANISMS = KAFKA_PROTOCOLS, SASL_MECHANISMS
VARIABLES = tuple(KafkaSecuritySettings.variables())


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: str = "PLAINTEXT"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)   # never in a repr, a log line or an error

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaSecurity:
        settings = read(KafkaSecuritySettings, env)   # each variable's own check: pgkd.settings
        protocol, ca_file, cert_file, key_file = (settings.security_protocol, settings.ca_file, settings.cert_file,
                                                  settings.key_file)
        tls_given = [f"PGKD_KAFKA_{n}" for n, v in (("CA_FILE", ca_file), ("CERT_FILE", cert_file),
                                                     ("KEY_FILE", key_file)) if v]
        if tls_given and protocol not in ("SSL", "SASL_SSL"):
            # A CA or a client certificate with a plaintext protocol is a half-done TLS setup: say so
            # rather than connect unencrypted.
            raise UserError(f"{tls_given[0]} is set but PGKD_KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS "
                            "(SSL or SASL_SSL)")
        if bool(cert_file) != bool(key_file):
            given, missing = ("CERT_FILE", "KEY_FILE") if cert_file else ("KEY_FILE", "CERT_FILE")
            raise UserError(f"PGKD_KAFKA_{given} is set without PGKD_KAFKA_{missing}: a client certificate "
                            "needs both")
        for name, path in (("CA_FILE", ca_file), ("CERT_FILE", cert_file), ("KEY_FILE", key_file)):
            if path:
                _readable(f"PGKD_KAFKA_{name}", path)

        mechanism, username = settings.sasl_mechanism, settings.sasl_username
        password = settings.sasl_password.get_secret_value() if settings.sasl_password else None
        sasl_given = [n for n, v in (("PGKD_KAFKA_SASL_MECHANISM", mechanism), ("PGKD_KAFKA_SASL_USERNAME", username),
                                     ("PGKD_KAFKA_SASL_PASSWORD", password)) if v]
        if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            if mechanism is None:
                raise UserError(f"PGKD_KAFKA_SECURITY_PROTOCOL={protocol} needs PGKD_KAFKA_SASL_MECHANISM "
                                f"({', '.join(MECHANISMS)})")
            if username is None:
                raise UserError(f"PGKD_KAFKA_SECURITY_PROTOCOL={protocol} needs PGKD_KAFKA_SASL_USERNAME")
            if password is None:
                raise UserError(f"PGKD_KAFKA_SECURITY_PROTOCOL={protocol} needs PGKD_KAFKA_SASL_PASSWORD "
                                "or PGKD_KAFKA_SASL_PASSWORD_FILE")
        elif sasl_given:
            raise UserError(f"{sasl_given[0]} is set but PGKD_KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL "
                            "(SASL_PLAINTEXT or SASL_SSL)")

        security = cls(protocol, ca_file, cert_file, key_file, mechanism, username, password)
        if security.uses_tls:
            security.ssl_context()   # a file that is not PEM, or a key that does not match, fails now
        return security

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS client context: the brokers' certificates verified against PGKD_KAFKA_CA_FILE (or the
        system's CAs), host names checked, the client certificate presented when there is one."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context()
        if self.ca_file:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except ssl.SSLError as e:
                raise UserError(f"PGKD_KAFKA_CA_FILE={self.ca_file}: not a PEM CA bundle ({e.reason or e})") from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as e:
                raise UserError(f"PGKD_KAFKA_CERT_FILE={self.cert_file}, PGKD_KAFKA_KEY_FILE={self.key_file}: "
                                f"not a PEM certificate and its key ({e.reason or e})") from None
        return context

    # -- the shape each client library wants --------------------------------------------------------------
    def faststream(self):
        """`security=` of FastStream's KafkaBroker (None for PLAINTEXT)."""
        from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
        if not self.uses_sasl:
            return BaseSecurity(ssl_context=self.ssl_context()) if self.uses_tls else None
        sasl = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
        return sasl[self.sasl_mechanism](self.sasl_username, self.sasl_password, ssl_context=self.ssl_context(),
                                         use_ssl=self.uses_tls)

    def aiokafka(self) -> dict:
        """Keyword arguments of aiokafka's AIOKafkaClient, AIOKafkaProducer and AIOKafkaConsumer."""
        kwargs: dict = {"security_protocol": self.protocol}
        if self.uses_tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kwargs.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
        return kwargs

    def kafka_python(self) -> dict:
        """Keyword arguments of kafka-python's KafkaAdminClient and KafkaProducer."""
        kwargs: dict = {"security_protocol": self.protocol}
        if self.uses_tls:
            kwargs.update(ssl_cafile=self.ca_file, ssl_certfile=self.cert_file, ssl_keyfile=self.key_file)
        if self.uses_sasl:
            kwargs.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
            # kafka-python's admin client logs its whole configuration, password included, at DEBUG.
            kafka_logger = logging.getLogger("kafka")
            if kafka_logger.getEffectiveLevel() < logging.INFO:
                kafka_logger.setLevel(logging.INFO)
        return kwargs


@functools.cache
def current() -> KafkaSecurity:
    """This process's settings, read once (a bad one raises each time it is asked for: nothing is cached)."""
    return KafkaSecurity.from_env()


def _readable(variable: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"{variable}={path}: cannot read it ({e.strerror})") from None
