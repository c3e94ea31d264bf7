"""Building the PEP 3333 environ: the per-server base dict, header keys, the target."""

from __future__ import annotations

import re
import sys
from typing import Any
from urllib.parse import unquote_to_bytes

from cppnp._version import __version__

__all__ = ["header_key", "make_base_environ", "split_target", "valid_host"]

SERVER_SOFTWARE = "cppnp/%s" % __version__

# Raw header name (bytes, as received) -> environ key, or "" for a dropped header.
# Bounded: a client sending many distinct names cannot grow it past _MAX_KEYS.
_KEYS: dict[bytes, str] = {}
_MAX_KEYS = 4096


def header_key(name: bytes) -> str:
    """Return the environ key for header *name* ("" to drop it).

    ``Content-Type`` and ``Content-Length`` have no ``HTTP_`` prefix (PEP 3333).  Names with
    an underscore are dropped: ``X_Forwarded_For`` would otherwise be indistinguishable
    from ``X-Forwarded-For`` in the environ (a header-spoofing vector behind proxies).
    """
    key = _KEYS.get(name)
    if key is not None:
        return key
    text = name.decode("latin-1")
    if "_" in text:
        key = ""
    else:
        key = text.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
    if len(_KEYS) < _MAX_KEYS:
        _KEYS[name] = key
    return key


def make_base_environ(
    *,
    server_name: str,
    server_port: int,
    script_name: str,
    url_scheme: str,
    multithread: bool,
    multiprocess: bool,
    file_wrapper: Any,
) -> dict[str, Any]:
    """The keys every request shares; each request starts from a copy of it."""
    return {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url_scheme,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": file_wrapper,
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "SERVER_NAME": server_name,
        "SERVER_PORT": str(server_port),
        "SCRIPT_NAME": script_name,
    }


def _decode_path(path: bytes) -> str:
    # PEP 3333: PATH_INFO is the URL-decoded path, its bytes decoded as latin-1.
    if b"%" in path:
        path = unquote_to_bytes(path)
    return path.decode("latin-1")


def split_target(url: bytes) -> tuple[str, str, str | None] | None:
    """Split a request target into (PATH_INFO, QUERY_STRING, authority or None).

    origin-form ``/p?q``, absolute-form ``http://host/p?q`` (the authority is returned: it
    replaces Host, RFC 9112 section 3.2.2) and asterisk-form ``*``.  Returns None for a
    target that is none of these.
    """
    authority = None
    if url[:1] != b"/":
        if url == b"*":
            return "", "", None  # OPTIONS *: no path (REQUEST_URI keeps the "*")
        sep = url.find(b"://")
        if sep <= 0 or url[:sep].lower() not in (b"http", b"https"):
            return None
        rest = url[sep + 3 :]
        end = len(rest)
        for ch in (b"/", b"?"):
            i = rest.find(ch)
            if 0 <= i < end:
                end = i
        authority = rest[:end].decode("latin-1")
        if not authority or "@" in authority:
            return None
        url = rest[end:]
        if url[:1] != b"/":
            url = b"/" + url
    hash_at = url.find(b"#")
    if hash_at >= 0:
        url = url[:hash_at]
    q = url.find(b"?")
    if q < 0:
        return _decode_path(url), "", authority
    return _decode_path(url[:q]), url[q + 1 :].decode("latin-1"), authority


# RFC 9110 Host = uri-host [ ":" port ]; uri-host = IP-literal / IPv4address / reg-name.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?\Z")


def valid_host(host: str) -> bool:
    return _HOST_RE.match(host) is not None
