"""URLs and files through fsspec: local paths, ``file://``, ``memory://`` and ``s3://`` behave the same.

Every helper here retries transient errors (connection refused/reset, timeouts, 5xx, SlowDown) with
exponential backoff, and every write is atomic: a reader sees the old object, the new one, or none, never a
partial one. Local writes go to a temp file in the destination directory and are committed with
``os.replace``; an S3 PUT (or a completed multipart upload) is atomic by itself.

S3 settings come from the environment (see ``storage_options``), so subprocesses, Dagster steps and torchrun
ranks all resolve the same endpoint and credentials without passing them around.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from typing import Any, Callable, TypeVar

import fsspec

T = TypeVar("T")

LOCAL_PROTOCOLS = ("file", "local")
ENDPOINT_ENV_VARS = ("SFD_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
EXTRA_OPTIONS_ENV_VAR = "SFD_STORAGE_OPTIONS"
RETRY_ATTEMPTS_ENV_VAR = "SFD_STORAGE_RETRY_ATTEMPTS"
DEFAULT_RETRY_ATTEMPTS = 10  # with the backoff below: ~25-45 s of trying before giving up


# ----------------------------------------------------------------------------------------------- URLs

def protocol(url: str) -> str:
    """``"s3"`` for ``s3://b/k``; ``"file"`` for plain paths and ``file://``."""
    if "://" not in url:
        return "file"
    proto = url.split("://", 1)[0]
    return "file" if proto in LOCAL_PROTOCOLS else proto


def is_local(url: str) -> bool:
    return protocol(url) == "file"


def join(root: str, *parts: str) -> str:
    """Join path segments onto a local path or a URL (``s3://bkt/pfx`` + ``a``, ``b`` -> ``s3://bkt/pfx/a/b``)."""
    segments = [p.strip("/") for p in parts if p and p.strip("/")]
    if "://" not in root:
        return os.path.join(root, *segments)
    if root.endswith("://"):  # e.g. "memory://": the first segment starts the path
        return root + "/".join(segments)
    return "/".join([root.rstrip("/"), *segments])


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------- options, filesystems

def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url`` from the environment; ``{}`` for local paths.

    s3: ``SFD_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``) -> ``client_kwargs.endpoint_url``;
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` -> ``key``/``secret``. Any remote protocol: the JSON object
    in ``SFD_STORAGE_OPTIONS`` is deep-merged on top (it wins over the variables above).
    """
    proto = protocol(url)
    if proto == "file":
        return {}
    options: dict[str, Any] = {}
    if proto in ("s3", "s3a"):
        # Listings must not be cached: other processes write to the same prefixes and servers restart.
        options["use_listings_cache"] = False
        # botocore retries each request once (covers zarr/webdataset reads that bypass our helpers); the
        # long, jittered window is ours (``retrying``), so a restarted server is noticed within seconds.
        options["config_kwargs"] = {"retries": {"mode": "standard", "total_max_attempts": 2},
                                    "connect_timeout": 5}
        endpoint = next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
            options["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    extra = os.environ.get(EXTRA_OPTIONS_ENV_VAR)
    if extra:
        try:
            parsed = json.loads(extra)
        except json.JSONDecodeError as e:
            raise ValueError(f"{EXTRA_OPTIONS_ENV_VAR} must be a JSON object: {e}") from e
        if not isinstance(parsed, dict):
            raise ValueError(f"{EXTRA_OPTIONS_ENV_VAR} must be a JSON object, got {type(parsed).__name__}")
        options = _deep_merge(options, parsed)
    return options


_filesystems: dict[tuple[str, str], fsspec.AbstractFileSystem] = {}
_filesystems_lock = threading.Lock()
_inherited_from_parent: list[Any] = []


def _after_fork_in_child() -> None:
    """Start a fresh cache in a forked child, but keep every inherited filesystem alive, ours and fsspec's.

    The parent's event loop and connections are unusable in the child. Worse, if an inherited s3fs instance
    is garbage-collected while the child runs its own loop, its finalizer closes the parent's sockets through
    the parent's loop object, whose epoll instance is shared with the parent: the parent's sockets get
    unregistered there and its next request on a pooled connection waits forever. Pinned, they never close.
    """
    global _filesystems_lock
    _filesystems_lock = threading.Lock()  # another thread may have held it at fork time
    _inherited_from_parent.append(dict(_filesystems))
    _filesystems.clear()
    pending = [fsspec.AbstractFileSystem]
    while pending:  # fsspec's own instance caches (zarr, UPath... use them) are cleared on first use
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        _inherited_from_parent.append(list(getattr(cls, "_cache", {}).values()))


os.register_at_fork(after_in_child=_after_fork_in_child)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (cached) fsspec filesystem for ``url`` and the path inside it.

    Instances are cached per (protocol, options); a forked child starts a fresh cache (see
    ``_after_fork_in_child``), a spawned process starts empty anyway.
    """
    proto = protocol(url)
    options = storage_options(url)
    key = (proto, json.dumps(options, sort_keys=True, default=str))
    with _filesystems_lock:
        fs = _filesystems.get(key)
        if fs is None:
            # skip_instance_cache: our key already decides reuse; fsspec's cache would outlive option changes.
            fs = fsspec.filesystem(proto, skip_instance_cache=True, **options)
            _filesystems[key] = fs
    return fs, fs._strip_protocol(url)


def clear_filesystem_cache() -> None:
    """Forget cached filesystems (tests switching servers or credentials call this)."""
    with _filesystems_lock:
        _filesystems.clear()


# -------------------------------------------------------------------------------------------- retries

# Exception class names (anywhere in the MRO or the cause chain) that mean "try again": connection problems,
# timeouts and truncated responses from botocore, aiohttp, urllib3 and s3fs.
_TRANSIENT_CLASS_NAMES = frozenset({
    "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError",
    "BrokenPipeError", "TimeoutError", "timeout", "EndpointConnectionError", "ConnectTimeoutError",
    "ReadTimeoutError", "ConnectionClosedError", "HTTPClientError", "IncompleteRead", "ResponseParserError",
    "ServerDisconnectedError", "ClientConnectorError", "ClientConnectionError", "ClientOSError",
    "ClientPayloadError", "FSTimeoutError", "ProtocolError",
})
# Server answers that mean "busy or broken right now", not "you asked for something wrong".
_TRANSIENT_MESSAGE_MARKERS = (
    "SlowDown", "reduce your request rate", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "Throttl", "TooManyRequests", "Connection refused", "Connection reset", "Server disconnected",
    "(500)", "(502)", "(503)", "(504)",
)
# Never retried, whatever their cause chain says.
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError,
                    NotADirectoryError, ValueError, TypeError, KeyError)


def _cause_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _http_status(exc: BaseException) -> int:
    """The HTTP status of a botocore ClientError (0 when there is none)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return 0
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status if isinstance(status, int) else 0


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying (network, timeouts, 5xx, throttling); False for missing/forbidden/bad input."""
    if isinstance(error, _PERMANENT_TYPES):
        return False
    for exc in _cause_chain(error):
        if isinstance(exc, _PERMANENT_TYPES) and exc is not error:
            return False
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
            return True
        if _http_status(exc) >= 500:
            return True
        if any(marker in str(exc) for marker in _TRANSIENT_MESSAGE_MARKERS):
            return True
    return False


def retrying(fn: Callable[..., T], *args: Any, attempts: int | None = None, base_delay: float = 0.25,
             max_delay: float = 10.0, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)``; on a transient error sleep (exponential backoff, full jitter) and retry.

    ``attempts`` defaults to ``$SFD_STORAGE_RETRY_ATTEMPTS`` or 10. Permanent errors (missing object, access
    denied, bad arguments) propagate at once. ``fn`` must be safe to repeat (all helpers here are).
    """
    total = attempts if attempts is not None else int(os.environ.get(RETRY_ATTEMPTS_ENV_VAR,
                                                                     DEFAULT_RETRY_ATTEMPTS))
    for attempt in range(1, total + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - classified right below
            if attempt >= total or not is_transient(error):
                raise
            ceiling = min(max_delay, base_delay * 2 ** (attempt - 1))
            # Half fixed, half random: spreads out many ranks retrying against one endpoint.
            time.sleep(ceiling * (0.5 + 0.5 * random.random()))
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------ file helpers

def _with_retries(url: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``retrying`` plus a message that says where and as whom access was denied (never the secret)."""
    try:
        return retrying(fn, *args, **kwargs)
    except PermissionError as error:
        if is_local(url):
            raise
        options = storage_options(url)
        endpoint = options.get("client_kwargs", {}).get("endpoint_url", "the default endpoint")
        key_id = options.get("key", "the AWS credential chain")
        raise PermissionError(
            f"access denied for {url} at {endpoint} with key id {key_id!r}: {error}. Check AWS_ACCESS_KEY_ID/"
            f"AWS_SECRET_ACCESS_KEY (or {EXTRA_OPTIONS_ENV_VAR}) and the bucket's permissions.") from error


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return _with_retries(url, fs.exists, path)


def ls(url: str) -> list[str]:
    """Sorted full URLs of the entries directly under ``url``; ``[]`` when there is nothing there
    (S3 has no empty directories, so a missing prefix and an empty one are the same)."""
    fs, path = filesystem(url)
    try:
        entries = _with_retries(url, fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    names = sorted({basename(e) for e in entries if e.rstrip("/") != path.rstrip("/")})
    return [join(url, name) for name in names]


def rm(url: str, recursive: bool = False) -> None:
    """Remove a file (or a tree with ``recursive=True``); removing something missing is not an error."""
    fs, path = filesystem(url)
    try:
        _with_retries(url, fs.rm, path, recursive=recursive)
    except FileNotFoundError:
        pass


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return _with_retries(url, fs.cat_file, path)


def _local_temp_path(path: str) -> str:
    """A fresh temp name next to ``path`` (same filesystem, so ``os.replace`` is atomic)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=directory)
    os.close(fd)
    return tmp


def _commit_local(tmp: str, path: str) -> None:
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; committed files are ordinary files
    os.replace(tmp, path)


def _write_local_atomic(path: str, data: bytes) -> None:
    tmp = _local_temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _commit_local(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def _discard(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (local: temp file + rename; remote: one PUT)."""
    fs, path = filesystem(url)
    if is_local(url):
        _write_local_atomic(path, bytes(data))
    else:
        _with_retries(url, fs.pipe_file, path, bytes(data))


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url).decode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    """Atomic JSON write (indented, keys sorted, so diffs and hashes of manifests are stable)."""
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def put_file(local_path: str, url: str) -> None:
    """Upload a local file to ``url`` atomically (large files go as one multipart upload, which S3 only
    makes visible when it completes)."""
    fs, path = filesystem(url)
    if is_local(url):
        tmp = _local_temp_path(path)
        try:
            fs.get_file(os.path.abspath(local_path), tmp)  # a plain copy
            _commit_local(tmp, path)
        except BaseException:
            _discard(tmp)
            raise
    else:
        _with_retries(url, fs.put_file, local_path, path)


def get_file(url: str, local_path: str) -> None:
    """Download ``url`` to ``local_path`` atomically (an interrupted download leaves no file behind)."""
    fs, path = filesystem(url)
    tmp = _local_temp_path(local_path)
    try:
        _with_retries(url, fs.get_file, path, tmp)
        _commit_local(tmp, local_path)
    except BaseException:
        _discard(tmp)
        raise


def open(url: str, mode: str = "rb", **kwargs: Any):  # noqa: A001 - mirrors fsspec.open
    """An fsspec file object for streaming reads. Writes through it are NOT atomic on local disk:
    use ``write_bytes``/``put_file`` (or write a temp file and ``put_file``) for committed outputs."""
    fs, path = filesystem(url)
    if "w" in mode and is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _with_retries(url, fs.open, path, mode, **kwargs)
