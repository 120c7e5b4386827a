"""A remote backend's failures (no credentials, access denied, no such bucket, unreachable) as
deltastore's errors: one line naming the remote and what to set or check."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from ..core.errors import DeltastoreError, RemoteError
from .remotenames import LOCAL_SCHEMES


def backend_errors(url: str) -> Any:
    """A backend's failures (no credentials, access denied, no such bucket, unreachable) as one
    line naming the remote and what to set or check. Anything else is no backend's failure but a
    fault here, and keeps its traceback."""
    @contextmanager
    def wrap():
        try:
            yield
        except DeltastoreError:
            raise
        except Exception as e:
            failure = backend_failure(url, e)
            if failure is None:
                raise
            raise failure from None
    return wrap()


# The backends' own exception classes, by name: naming them needs none of botocore, aiohttp,
# google-auth or azure-core imported (a remote's backend is imported only when it is opened).
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "CredentialUnavailableError", "ClientAuthenticationError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProxyConnectionError",
                "ClientConnectorError", "ServerTimeoutError", "ServiceRequestError", "TransportError"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "AuthFailure"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "Forbidden", "403"}
_CREDENTIALS = {  # where each backend looks for them
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile in ~/.aws/credentials)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`",
    "az": "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
}
_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "adl": "az"}
_ENDPOINTS = {"s3": "AWS_ENDPOINT_URL"}


def backend_failure(url: str, e: BaseException) -> RemoteError | None:
    """`e` as one line that says what to set or check, or None when it is no backend's failure."""
    names = {c.__name__ for c in type(e).__mro__}
    code = _service_code(e)
    scheme = urlsplit(url).scheme
    scheme = _ALIASES.get(scheme, scheme)
    detail = " ".join(str(e).split())[:200] or type(e).__name__
    credentials = _CREDENTIALS.get(scheme, "the backend's credentials, in its usual places")
    if names & _NO_CREDENTIALS:
        return RemoteError(f"no credentials for {url} ({detail}): set {credentials}", url=url)
    if code in _CREDENTIAL_CODES:
        return RemoteError(f"the credentials for {url} were refused ({detail}): check {credentials}", url=url)
    if isinstance(e, PermissionError) and scheme in LOCAL_SCHEMES:
        return RemoteError(f"access to {url} denied ({detail}): check the folder's permissions", url=url)
    if isinstance(e, PermissionError) or code in _DENIED_CODES:
        return RemoteError(f"access to {url} denied ({detail}): check the bucket's permissions, and which "
                           f"credentials are in use: {credentials}", url=url)
    if no_bucket(e):
        return RemoteError(f"the bucket of {url} does not exist: check the URL, or create the bucket", url=url)
    if names & _UNREACHABLE or isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
        endpoint = _ENDPOINTS.get(scheme)
        where = f", and {endpoint} if it is set" if endpoint else ""
        return RemoteError(f"cannot reach {url} ({detail}): check the network and the endpoint's address{where}",
                           url=url)
    if isinstance(e, OSError):
        return RemoteError(f"remote {url} failed: {detail}", url=url)
    return None


def no_bucket(e: BaseException) -> bool:
    """The bucket itself is missing (not a file in it): S3's NoSuchBucket, which s3fs raises as
    a FileNotFoundError like a missing file's."""
    return _service_code(e) == "NoSuchBucket" or (isinstance(e, FileNotFoundError)
                                                  and "bucket does not exist" in str(e).lower())


def _service_code(e: BaseException) -> str | None:
    """The storage service's error code (S3's "NoSuchBucket", "AccessDenied"), from the error or
    the one it was translated from (s3fs raises an OSError whose cause holds it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            code = response["Error"].get("Code")
            return str(code) if code is not None else None
        e = e.__cause__ or e.__context__
    return None

