"""TLS material the tests make for themselves (trustme): a CA, and server certificates good and bad.

    pki = TestPKI(folder)
    pki.ca_file                        # the PEM to give the script as OAUTH_CA_BUNDLE
    pki.server_context("good")         # an ssl.SSLContext for HostileServer(tls=...)
    pki.cert_files("good")             # (certificate chain PEM, key PEM) paths, for a server in another process
    trust_in_this_process(pki.ca_file) # the tests' own requests (a person's browser, admin calls) trust it too

The kinds, one per thing a client must refuse (and "good"): "good" (our CA, 127.0.0.1 and localhost),
"expired" (our CA, the right names, expired yesterday), "wrong_name" (our CA, names only wrong.example),
"unknown_ca" (the right names, signed by a CA nobody trusts), "self_signed" (a certificate for 127.0.0.1
signed by its own key).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

KINDS = ("good", "expired", "wrong_name", "unknown_ca", "self_signed")
NAMES = ("127.0.0.1", "localhost")


def _self_signed(name: str) -> tuple[bytes, bytes]:
    """A certificate for `name` (an IP address) signed by its own key: what a device's default setup serves."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class TestPKI:
    """A CA the tests trust (ca_file) and one server certificate of each kind, written under `folder`."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path) -> None:
        import trustme

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        stranger = trustme.CA()
        now = dt.datetime.now(dt.timezone.utc)
        leaves: dict[str, Any] = {
            "good": self.ca.issue_cert(*NAMES),
            "expired": self.ca.issue_cert(*NAMES, not_before=now - dt.timedelta(days=30),
                                          not_after=now - dt.timedelta(days=1)),
            "wrong_name": self.ca.issue_cert("wrong.example"),
            "unknown_ca": stranger.issue_cert(*NAMES),
        }
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._files: dict[str, tuple[Path, Path]] = {}
        for kind, leaf in leaves.items():
            chain, key = folder / f"{kind}.chain.pem", folder / f"{kind}.key.pem"
            chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            leaf.private_key_pem.write_to_path(str(key))
            self._files[kind] = (chain, key)
        cert_pem, key_pem = _self_signed(NAMES[0])
        chain, key = folder / "self_signed.chain.pem", folder / "self_signed.key.pem"
        chain.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        self._files["self_signed"] = (chain, key)

    def cert_files(self, kind: str = "good") -> tuple[Path, Path]:
        """(certificate chain, private key) PEM files of a kind."""
        return self._files[kind]

    def server_context(self, kind: str = "good") -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        chain, key = self._files[kind]
        context.load_cert_chain(str(chain), str(key))
        return context

    def client_context(self) -> ssl.SSLContext:
        """What a client that trusts our CA uses (for the tests' own requests, e.g. a server's readiness check)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


_TRUSTED: list[Path] = []


def trust_in_this_process(ca_file: Path) -> None:
    """Let this process's requests (not the script's: its environment is built apart) trust a CA of the tests,
    beside certifi's: REQUESTS_CA_BUNDLE names a bundle of both. Additive, so servers of several tests coexist."""
    import certifi

    if ca_file in _TRUSTED:
        return
    _TRUSTED.append(ca_file)
    handle, bundle = tempfile.mkstemp(prefix="fetch-memos-tests-ca-", suffix=".pem")
    with os.fdopen(handle, "wb") as out:
        out.write(Path(certifi.where()).read_bytes())
        for trusted in _TRUSTED:
            out.write(b"\n" + trusted.read_bytes())
    os.environ["REQUESTS_CA_BUNDLE"] = bundle



def made_pki(tmp_path_factory: Any) -> TestPKI:
    """For a module's fixture: `pki = pytest.fixture(scope="module")(made_pki)`."""
    return TestPKI(tmp_path_factory.mktemp("pki"))
