"""A moto server on 127.0.0.1 for the AWS tests (never real AWS, never another address)."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

REGION = "us-east-2"


@contextmanager
def moto_server() -> Iterator[str]:
    os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://127.0.0.1:{port}"
    configure(url, {"batch": {"use_docker": False}})
    try:
        yield url
    finally:
        server.stop()


def configure(url: str, config: dict) -> None:
    req = urllib.request.Request(
        f"{url}/moto-api/config", data=json.dumps(config).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=60).read()


def reset(url: str) -> None:
    req = urllib.request.Request(f"{url}/moto-api/reset", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=60).read()  # (a loaded 2-core machine: 10 s was not always enough)
