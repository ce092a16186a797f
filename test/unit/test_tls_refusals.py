"""classify_refusal for what a real handshake cannot easily produce here: a verify code
with no cause of its own, and the handshake timeout (real handshakes are in
test/integration/test_tls_refusals.py)."""

from __future__ import annotations

import ssl

from antrea_flow.tls.refusals import classify_refusal


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    # The attributes _ssl sets on the error it raises for CERTIFICATE_VERIFY_FAILED.
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.reason = "CERTIFICATE_VERIFY_FAILED"
    exc.verify_code = code
    exc.verify_message = message
    return exc


def test_an_unlisted_verify_code_is_not_blamed_on_the_ca():
    # X509_V_ERR_INVALID_CA: the issuer is not a CA certificate.
    label, why = classify_refusal(verify_error(24, "invalid CA certificate"))
    assert label == "tls_error"
    assert "invalid CA certificate" in why and "24" in why
    assert "not signed by our CA" not in why


def test_a_handshake_timeout():
    assert classify_refusal(TimeoutError())[0] == "handshake_timeout"
