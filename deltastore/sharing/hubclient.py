"""The huggingface_hub client: imported only when called, so that the rest of the library
works without it, and its exceptions turned into deltastore's (one line each, with the repo and
revision). The only modules that use the client, hub.py (push, pull) and hubbase.py (bases
fetched from the Hub), reach it through here; this module never touches a store."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from ..core.errors import (DeltastoreError, HubAccessDenied, HubConflict, HubError, HubRepoNotFound, HubRequestRefused,
                     HubRevisionNotFound, HubUnreachable, NotADeltaRepo)


def client() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401
    except ImportError:
        raise DeltastoreError("the Hub commands need huggingface_hub: pip install 'deltastore[hub]'") from None
    return huggingface_hub


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


@contextmanager
def hub_errors(repo_id: str, revision: str | None, endpoint: str) -> Iterator[None]:
    """The client's exceptions as deltastore errors: one line, with the repo and revision."""
    from huggingface_hub import errors as e

    try:
        yield
    except DeltastoreError:
        raise
    except e.OfflineModeIsEnabled:
        raise HubUnreachable(repo_id, endpoint, "HF_HUB_OFFLINE is set", revision=revision) from None
    except e.GatedRepoError as err:
        raise HubAccessDenied(repo_id, "it is gated and this token is not on its list", revision=revision,
                              status=_status(err)) from None
    except e.RepositoryNotFoundError:
        raise HubRepoNotFound(repo_id, endpoint=endpoint, revision=revision) from None
    except e.RevisionNotFoundError:
        raise HubRevisionNotFound(repo_id, revision or "main") from None
    except e.LocalEntryNotFoundError:  # what a download raises when it cannot connect
        raise HubUnreachable(repo_id, endpoint, "no connection, and the file is not in the cache",
                             revision=revision) from None
    except e.EntryNotFoundError as err:
        raise NotADeltaRepo(repo_id, revision, f"a file it lists is missing: {_server_message(err)}") from None
    except e.HfHubHTTPError as err:
        status = _status(err)
        if status in (401, 403):
            raise HubAccessDenied(repo_id, _server_message(err), revision=revision, status=status) from None
        if status == 412:
            raise HubConflict(f"{repo_id} changed while pushing (another push?); push again",
                              repo_id=repo_id, revision=revision) from None
        kind = HubRequestRefused if status is not None and 400 <= status < 500 else HubError
        raise kind(f"the Hub at {endpoint} answered {status} for {repo_id}: {_server_message(err)}",
                   repo_id=repo_id, revision=revision) from None
    except e.HFValidationError as err:
        raise HubRequestRefused(f"{repo_id!r} is not a Hub repo id or revision ({_first_line(err)})",
                                repo_id=repo_id, revision=revision) from None
    except Exception as err:
        if _is_connection_error(err):
            raise HubUnreachable(repo_id, endpoint, _first_line(err) or type(err).__name__,
                                 revision=revision) from None
        raise


def _status(err: Any) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _server_message(err: Any) -> str:
    return (getattr(err, "server_message", None) or _first_line(err)).strip().rstrip(".")


def _first_line(err: BaseException) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), "")


def _is_connection_error(err: BaseException) -> bool:
    # The client's HTTP library raises its own transport errors; name-matching keeps this module
    # free of a direct dependency on which library that is.
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"TransportError", "ConnectError", "ConnectionError", "TimeoutException", "Timeout",
                         "NetworkError", "ProtocolError"}) or isinstance(err, (ConnectionError, TimeoutError))
