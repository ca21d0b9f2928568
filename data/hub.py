"""Is the Hugging Face hub reachable? Answered in seconds, once per process, so an
offline machine fails fast instead of spending minutes in HTTP retries."""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_HINT = ("offline? pick a preset that reads local files (e.g. 10_local_tiny), or put "
                "your .txt/.md/.pdf files in a folder and list it under data.sources")


@functools.lru_cache(maxsize=1)
def hub_status(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason). Honours HF_HUB_OFFLINE and HF_ENDPOINT."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.getaddrinfo(host, port)  # DNS failure is the common offline case: immediate
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"Hugging Face hub ({host}) unreachable: {e.__class__.__name__}: {e}"
