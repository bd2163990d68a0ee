"""Keeping credentials out of what operators see (CLI output, logs, the API).

Database, broker and Orthanc URLs may carry a password; every place that
shows one shows :func:`mask` of it, and error messages that may quote a URL
go through :func:`hide_secrets`.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def mask(url: str) -> str:
    """``url`` with any password replaced by ``***`` (also in ``a;b`` failover lists)."""
    return ";".join(_mask_one(part) for part in url.split(";"))


def _mask_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # unparsable (a bad port…): hide everything before the host
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return url
    if password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def hide_secrets(message: str, *urls: str) -> str:
    """``message`` with the passwords of ``urls`` replaced by ``***``."""
    for url in urls:
        for part in url.split(";"):
            try:
                password = urlsplit(part).password
            except ValueError:
                continue
            if password:
                message = message.replace(password, "***")
    return message
