"""The control plane's transport: gRPC over TLS, with the coordinator's certificate pinned by its
SHA-256 fingerprint.

On first start the coordinator makes a private key and a self-signed certificate in its state
directory (or takes the operator's --tls-cert/--tls-key) and prints the join command with the
certificate's fingerprint. A worker fetches the certificate the coordinator presents, refuses it
unless its fingerprint is the pinned one, and then trusts exactly that certificate for the gRPC
channel: an impostor cannot present it without the private key. Plaintext is only for loopback
(demos, tests), and only when asked for.
"""

import datetime
import hashlib
import ipaddress
import re
import socket
import ssl
from pathlib import Path

import grpc

from gptswarm.errors import UserError
from gptswarm.private import write_private

NAME = "gptswarm-coordinator"  # the name in a generated certificate; workers check the certificate against it
LOOPBACK_NAMES = ("localhost",)


def fingerprint(cert_pem):
    """sha256:<hex> of the certificate's DER bytes (what `openssl x509 -fingerprint -sha256` shows)."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode() if isinstance(cert_pem, bytes) else cert_pem)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def certificate_name(cert_pem):
    """The name a worker checks the certificate against: its first DNS name, else its common name."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
    except x509.ExtensionNotFound:
        pass
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return cn[0].value if cn else NAME


def coordinator_certificate(state_dir, cert_path="", key_path=""):
    """(certificate PEM, key PEM): the operator's, or the state directory's own (made on first use).
    UserError if they cannot be read or do not belong together."""
    if cert_path or key_path:
        if not (cert_path and key_path):
            raise UserError("give both --tls-cert and --tls-key, or neither")
        try:
            cert_pem, key_pem = Path(cert_path).read_bytes(), Path(key_path).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read the TLS certificate or key: {e}") from None
    else:
        cert, key = Path(state_dir) / "tls-cert.pem", Path(state_dir) / "tls-key.pem"
        if not (cert.exists() and key.exists()):
            cert_pem, key_pem = self_signed()
            write_private(key, key_pem)
            cert.write_bytes(cert_pem)
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    check_pair(cert_pem, key_pem)
    return cert_pem, key_pem


def check_pair(cert_pem, key_pem):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"the TLS certificate or key is not a PEM certificate / unencrypted PEM key: {e}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, pub)
            != key.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise UserError("the TLS key does not belong to the TLS certificate")


def self_signed(days=3650):
    """A new P-256 key and a self-signed certificate for NAME."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def is_loopback(host):
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address):
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def normal_pin(pin):
    """sha256:<64 lowercase hex> from the coordinator's form, bare hex, or openssl's
    (`openssl x509 -noout -fingerprint -sha256`: "sha256 Fingerprint=AB:CD:..."); UserError if none."""
    text = pin.strip().lower().replace("sha256 fingerprint=", "").replace("sha256:", "").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise UserError(f"--tls-fingerprint {pin[:80]!r} is not a SHA-256 fingerprint (sha256: and 64 hex digits, "
                        "as the coordinator printed it)")
    return "sha256:" + text


def presented_certificate(address, timeout=10.0):
    """The certificate (PEM) the server at address presents, unverified (the caller checks it);
    ConnectionError if nothing answers TLS there."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the caller checks its fingerprint
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except ssl.SSLError as e:
        raise UserError(f"the coordinator at {address} does not answer TLS ({e.reason or e}): is it a gptswarm "
                        "coordinator, or one running --plaintext (then join with --plaintext, loopback only)?") from None
    except OSError as e:
        raise ConnectionError(f"cannot reach {address} over TLS: {e}") from None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def self_issued(cert_pem):
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.issuer == cert.subject


def check_trusted(address, timeout=10.0):
    """UserError unless this machine's CA roots trust the certificate at address for its host name."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ssl.create_default_context().wrap_socket(raw, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as e:
        raise UserError(f"the coordinator at {address} presents a certificate this machine does not trust "
                        f"({e.verify_message}): join with the --tls-fingerprint its operator printed") from None
    except (OSError, ssl.SSLError) as e:
        raise ConnectionError(f"cannot reach {address} over TLS: {e}") from None


def channel(address, *, pin="", plaintext=False, options=()):
    """A gRPC channel to the coordinator at address:
    - pin ("sha256:<hex>"): over TLS, only if it presents the certificate with that fingerprint
      (a self-signed one is then the channel's only root of trust; a CA-issued one must also
      verify against this machine's roots);
    - plaintext: no TLS, only to a loopback address;
    - neither: over TLS, with a certificate this machine's CA roots trust for that host name.
    UserError for a refused certificate or a plaintext address off loopback; ConnectionError if
    the coordinator does not answer (retry)."""
    host, _ = split_address(address)
    options = list(options)
    if plaintext:
        if not is_loopback(host):
            raise UserError(f"--plaintext is only for a coordinator on this machine (loopback), not {host}: "
                            "use --tls-fingerprint")
        return grpc.insecure_channel(address, options=options)
    if not pin:
        check_trusted(address)
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(), options=options)
    pin = normal_pin(pin)
    pem = presented_certificate(address)
    seen = fingerprint(pem)
    if seen != pin:
        raise UserError(f"the coordinator at {address} presented certificate {seen}, not the pinned {pin}: "
                        "refusing to talk to it (check --tls-fingerprint, or ask its operator)")
    if self_issued(pem):
        credentials = grpc.ssl_channel_credentials(root_certificates=pem)
        options.append(("grpc.ssl_target_name_override", certificate_name(pem)))
    else:
        check_trusted(address)
        credentials = grpc.ssl_channel_credentials()
    return grpc.secure_channel(address, credentials, options=options)
