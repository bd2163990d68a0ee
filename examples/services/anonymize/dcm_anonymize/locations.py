"""Reading an instance's file wherever its location points.

Local paths and ``file://`` URLs are read in place; ``http(s)://`` URLs (the
instance files of the Orthanc source, ``…/instances/<id>/file``) are
downloaded into a folder the caller owns. Each example service carries its
own copy: a service folder is self-contained by design.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import urllib.request
from urllib.parse import unquote, urlparse


def local_copy(location: object, downloads: str) -> str | None:
    """A filesystem path for ``location``, or None when it cannot be read."""
    if not isinstance(location, str) or not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme in ("http", "https"):
        target = os.path.join(downloads, hashlib.sha256(location.encode()).hexdigest() + ".dcm")
        if not os.path.exists(target):
            request = urllib.request.Request(location, headers=orthanc_auth(location))
            with urllib.request.urlopen(request, timeout=60) as response, open(target, "wb") as out:
                shutil.copyfileobj(response, out)
        return target
    return None if "://" in location else location


def orthanc_auth(location: str) -> dict[str, str]:
    """Basic auth for Orthanc when DCM_ORTHANC_URL carries credentials
    (stored locations never do)."""
    configured = urlparse(os.environ.get("DCM_ORTHANC_URL", ""))
    if not configured.username or configured.hostname != urlparse(location).hostname:
        return {}
    token = f"{unquote(configured.username)}:{unquote(configured.password or '')}"
    return {"Authorization": "Basic " + base64.b64encode(token.encode()).decode()}
