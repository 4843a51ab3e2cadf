"""Whether the Hugging Face Hub can be reached, decided once per process and quickly.

Without a route to the Hub, huggingface_hub retries every request with back-off (about 25 s and a dozen
lines per name) before it gives up. So a Hub model or dataset name first asks :func:`offline_reason`:
``HF_HUB_OFFLINE`` set, or one TCP connection to the Hub's endpoint that fails within a few seconds. Offline,
models resolve from the local Hugging Face cache only (the process switches to offline mode, exactly as
``HF_HUB_OFFLINE=1`` would), and a name that is not there is one line saying how to use a local directory.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlsplit

PROBE_SECONDS = 3.0
"""How long the one connection to the Hub may take (name lookup included) before the Hub counts as unreachable."""


def _reachable(host: str, port: int) -> bool:
    """One TCP connection to ``host:port``, in a daemon thread so a hanging name lookup cannot block us."""
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True, name="hub-probe")
    t.start()
    t.join(PROBE_SECONDS)
    return bool(ok)


@functools.lru_cache(maxsize=1)
def offline_reason() -> str | None:
    """Why the Hub cannot be used (``HF_HUB_OFFLINE=1``, or no route to it), or None when it can.

    When there is no route, the process is switched to offline mode (huggingface_hub's, transformers' and
    datasets' flag), so every later load reads the local Hugging Face cache instead of retrying the network."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(hub.ENDPOINT)
    host = url.hostname or "huggingface.co"
    if _reachable(host, url.port or (443 if url.scheme == "https" else 80)):
        return None
    hub.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return f"no route to {host}"


def offline_hint(what: str) -> str:
    """How to use a local copy instead of a Hub name, for the one-line error."""
    if what == "model":
        return ("give a local model directory (one with config.json, e.g. from `hf download NAME --local-dir DIR` or "
                "save_pretrained on a machine with network), or put the model in the Hugging Face cache")
    return ("give a local .txt, .jsonl or .parquet file (e.g. written by datasets' to_json or to_parquet on a machine "
            "with network)")
