"""
`C2paSigner`: C2PA Content Credentials with `c2pa-python`, from a PEM certificate chain and key checked at startup.

Signing runs in a small thread pool under a deadline: with a timestamp authority configured, c2pa's native code
makes an HTTP request that Python cannot interrupt.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from haystack import logging
from haystack.lazy_imports import LazyImport
from PIL import Image

from components.errors import SigningError
from components.image_codec import encode

with LazyImport(message="Run 'pip install \".[c2pa]\"' to sign images with C2PA Content Credentials.") as c2pa_import:
    import c2pa
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

logger = logging.getLogger(__name__)

SIGN_TIMEOUT = 10.0  # seconds for one image, a timestamp authority's answer included
SIGNING_THREADS = 4
PARENT_LABEL = "source"  # the ingredient an edit's `c2pa.opened` action names
# What a reader without our trust list says about a correct signature: it cannot know whether to trust the issuer.
_UNTRUSTED_CODES = frozenset({"signingCredential.untrusted", "timeStamp.untrusted"})


class C2paSigner:
    """Signs PNG, JPEG and WebP bytes with one certificate and key, loaded and proven once."""

    def __init__(self, cert_path: Path, key_path: Path, tsa_url: str | None, probe_manifest: dict[str, Any]) -> None:
        """
        Load and check the credentials, then sign a probe image and validate it.

        :param cert_path: PEM file: the signing certificate first, then the intermediates up to (not always
            including) the root.
        :param key_path: PEM file with the unencrypted private key of the signing certificate.
        :param tsa_url: RFC 3161 timestamp authority, or None.
        :param probe_manifest: The manifest of the probe image signed here.
        :raises ValueError: With a message naming the setting at fault.
        """
        c2pa_import.check()
        chain, key = _read(cert_path, "IMAGE_GENERATION_C2PA_CERT"), _read(key_path, "IMAGE_GENERATION_C2PA_KEY")
        algorithm = check_credentials(chain, key)
        self._context = c2pa.Context(settings=c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
        try:
            self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(algorithm, chain, key, tsa_url))
        except c2pa.C2paError as e:
            raise ValueError(f"c2pa refused the IMAGE_GENERATION_C2PA_CERT/KEY pair: {e}") from e
        self._pool = ThreadPoolExecutor(SIGNING_THREADS, thread_name_prefix="c2pa-sign")
        probe = encode(Image.new("RGB", (8, 8)), "png")  # signed once here, so that c2pa's refusals show at startup
        try:
            signed = self.sign(probe, "png", probe_manifest)
        except SigningError as e:
            settings = "IMAGE_GENERATION_C2PA_CERT/KEY" + (" and IMAGE_GENERATION_C2PA_TSA_URL" if tsa_url else "")
            raise ValueError(f"c2pa could not sign with {settings}: {str(e.__cause__ or '') or e}") from e
        failures = sorted(set(validation_failures(signed, "png")) - _UNTRUSTED_CODES)
        if failures:
            raise ValueError(f"images signed with IMAGE_GENERATION_C2PA_CERT/KEY do not validate: {failures}")

    def sign(self, data: bytes, image_format: str, manifest: dict[str, Any], parent: bytes | None = None) -> bytes:
        """
        The image with the manifest embedded and signed.

        :param parent: A PNG the image was made from (an edit's source), added as its `parentOf` ingredient under the
            label `PARENT_LABEL`, which the manifest's `c2pa.opened` action names.
        :raises SigningError: c2pa failed, or took longer than `SIGN_TIMEOUT` seconds.
        """
        future = self._pool.submit(self._sign, data, image_format, manifest, parent)
        try:
            return future.result(timeout=SIGN_TIMEOUT)
        except FutureTimeoutError as e:
            logger.error("C2PA signing ran past its {seconds:.0f} s deadline", seconds=SIGN_TIMEOUT)
            raise SigningError(f"C2PA signing ran past its {SIGN_TIMEOUT:.0f} s deadline") from e
        except Exception as e:  # whatever c2pa raises: a 503 for the client, the reason in our log
            logger.error("C2PA signing failed: {error}", error=str(e) or type(e).__name__)
            raise SigningError("C2PA signing failed") from e

    def _sign(self, data: bytes, image_format: str, manifest: dict[str, Any], parent: bytes | None) -> bytes:
        signed = BytesIO()
        with c2pa.Builder(manifest, self._context) as builder:
            if parent is not None:
                ingredient = {"title": "source.png", "relationship": "parentOf", "label": PARENT_LABEL}
                builder.add_ingredient(ingredient, "image/png", BytesIO(parent))
            builder.sign(self._signer, f"image/{image_format}", BytesIO(data), signed)
        return signed.getvalue()


def validation_failures(data: bytes, image_format: str) -> list[str]:
    """The validation status codes c2pa's `Reader` reports for a signed image (empty when fully trusted)."""
    with c2pa.Reader(f"image/{image_format}", BytesIO(data)) as reader:
        return [status["code"] for status in json.loads(reader.json()).get("validation_status", [])]


def check_credentials(chain: bytes, key: bytes) -> "c2pa.C2paSigningAlg":
    """
    Check that the chain is PEM, currently valid, and that the key is the first certificate's; return the algorithm.

    :raises ValueError: With a message naming the setting at fault and, for dates, the certificate's subject.
    """
    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError as e:
        raise ValueError("IMAGE_GENERATION_C2PA_CERT holds no PEM certificate") from e
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:  # never echoed: it is the key
        raise ValueError("IMAGE_GENERATION_C2PA_KEY is not an unencrypted PEM private key") from e
    now = datetime.now(UTC)
    for certificate in certificates:
        subject = certificate.subject.rfc4514_string()
        if now > certificate.not_valid_after_utc:
            raise ValueError(f"the C2PA certificate {subject!r} expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
        if now < certificate.not_valid_before_utc:
            raise ValueError(f"the C2PA certificate {subject!r} is not valid before {certificate.not_valid_before_utc}")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if certificates[0].public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != private_key.public_key().public_bytes(serialization.Encoding.DER, public):
        raise ValueError(
            "IMAGE_GENERATION_C2PA_KEY is not the key of the first certificate in IMAGE_GENERATION_C2PA_CERT"
        )
    return _algorithm(private_key)


def _algorithm(private_key: Any) -> "c2pa.C2paSigningAlg":
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if private_key.curve.name in by_curve:
            return c2pa.C2paSigningAlg[by_curve[private_key.curve.name]]
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return c2pa.C2paSigningAlg.ED25519
    if isinstance(private_key, rsa.RSAPrivateKey):
        return c2pa.C2paSigningAlg.PS256
    raise ValueError("IMAGE_GENERATION_C2PA_KEY must be an EC P-256/P-384/P-521, Ed25519 or RSA key")


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{setting}: cannot read {path} ({e.strerror})") from e
