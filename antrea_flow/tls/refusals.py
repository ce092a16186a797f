"""Why a collector refused a TLS peer: a metric label and an explanation for the operator.

A client certificate that fails verification always surfaces as CERTIFICATE_VERIFY_FAILED;
only OpenSSL's verify code (`ssl.SSLCertVerificationError.verify_code`) tells an expired
or not-yet-valid certificate, or one not meant for client authentication, from one that a
foreign CA signed. Server-side, OpenSSL 3 reports the same codes for TLS 1.2 and TLS 1.3.
"""

from __future__ import annotations

import ssl

# OpenSSL's X509_V_ERR_* codes (include/openssl/x509_vfy.h); the ssl module has no names.
_UNABLE_TO_GET_ISSUER_CERT = 2
_CERT_SIGNATURE_FAILURE = 7
_CERT_NOT_YET_VALID = 9
_CERT_HAS_EXPIRED = 10
_DEPTH_ZERO_SELF_SIGNED_CERT = 18
_SELF_SIGNED_CERT_IN_CHAIN = 19
_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
_INVALID_PURPOSE = 26

# What the agent needs whenever its certificate is the problem: the files the aggregator
# keeps current (it renews them when it starts).
_RECOPY = "copy ca.crt, tls.crt and tls.key from the aggregator's certDir to the agent's tlsCertDir"

_UNTRUSTED = ("untrusted_certificate", f"the client certificate is not signed by our CA: {_RECOPY}")

_VERIFY_FAILURES: dict[int, tuple[str, str]] = {
    # OpenSSL checks the time of every certificate in the chain, our CA included, and
    # reports the same code for each.
    _CERT_HAS_EXPIRED: (
        "expired_certificate",
        f"the client certificate (or the CA that signed it) has expired: {_RECOPY}",
    ),
    _CERT_NOT_YET_VALID: (
        "certificate_not_yet_valid",
        "the client certificate is not valid yet: its start time is ahead of this host's "
        "clock (clock skew between the host that issued it and this one: check NTP on both)",
    ),
    _INVALID_PURPOSE: (
        "wrong_certificate_purpose",
        "the client certificate is not for client authentication (extended key usage lacks "
        f"clientAuth; a server certificate such as server.crt?): {_RECOPY}",
    ),
    _CERT_SIGNATURE_FAILURE: (
        "bad_certificate_signature",
        "the client certificate's signature does not verify with our CA's key (altered or "
        f"corrupted, or issued by another CA of the same name): {_RECOPY}",
    ),
    # A foreign CA, a self-signed certificate, or an issuer we do not hold.
    _UNABLE_TO_GET_ISSUER_CERT: _UNTRUSTED,
    _DEPTH_ZERO_SELF_SIGNED_CERT: _UNTRUSTED,
    _SELF_SIGNED_CERT_IN_CHAIN: _UNTRUSTED,
    _UNABLE_TO_GET_ISSUER_CERT_LOCALLY: _UNTRUSTED,
    _UNABLE_TO_VERIFY_LEAF_SIGNATURE: _UNTRUSTED,
}


def classify_refusal(exc: BaseException) -> tuple[str, str]:
    """(metric label, explanation) for a failed server-side TLS handshake: a timeout, or
    the `ssl.SSLError` that the handshake raised."""
    if isinstance(exc, TimeoutError):
        return "handshake_timeout", "no TLS handshake within the timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        known = _VERIFY_FAILURES.get(exc.verify_code)
        if known is not None:
            return known
        return "tls_error", (
            f"the client certificate failed verification: {exc.verify_message} "
            f"(OpenSSL verify code {exc.verify_code})"
        )
    reason = getattr(exc, "reason", None) or type(exc).__name__
    text = str(reason).upper()
    if "WRONG_VERSION_NUMBER" in text or "HTTP_REQUEST" in text or "RECORD_LAYER" in text:
        return "not_tls", (
            "the peer does not speak TLS (plain IPFIX? check that the exporter's protocol is tls)"
        )
    if "CERTIFICATE_REQUIRED" in text or "PEER_DID_NOT_RETURN" in text:
        return "no_client_certificate", "the peer presented no client certificate"
    if "ALERT_UNKNOWN_CA" in text or "ALERT_BAD_CERTIFICATE" in text:
        return "peer_rejected_us", (
            "the peer does not trust this collector's certificate (check its CA and the "
            "server name it expects)"
        )
    return "tls_error", f"TLS handshake failed: {reason}"


# What a client sees when the certificates are the problem: it does not trust the server's
# (the collector's CA changed), or the server refused its own (alerts).
_CERTIFICATE_FAILURES = (
    "CERTIFICATE_VERIFY_FAILED",
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_REQUIRED",
    "UNSUPPORTED_CERTIFICATE",
)


def is_certificate_failure(exc: BaseException) -> bool:
    """A failed client handshake (or a session refused right after it) that fresh
    certificates may cure."""
    text = str(exc).upper()
    return any(failure in text for failure in _CERTIFICATE_FAILURES)
