"""A registry on 127.0.0.1 serving a stand-in for the official rclone image (never Docker Hub).

It speaks what corral reads of the OCI distribution spec: ``GET /v2/<name>/manifests/<digest>`` and
``/blobs/<digest>``, behind an anonymous bearer-token challenge as Docker Hub does (``401`` with
``WWW-Authenticate: Bearer realm=…,service=…,scope=…``, a token from the realm). The image is an
OCI index of linux/amd64 and linux/arm64 plus an attestation manifest (``unknown/unknown``), as
Docker Hub's multi-platform images are; each platform's config has ``Entrypoint ["rclone"]``.
Blobs redirect (307) to a ``/cdn/`` path that refuses a request still carrying the registry's
token, as presigned storage URLs do. ``tamper`` serves a layer whose bytes do not match its
digest; ``requests`` records every path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NAME = "rclone/rclone"
TAG = "1.74.4"
TOKEN = "fake-anonymous-token"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass
class FakeRegistry:
    big_layer_bytes: int = 0  # > 0: the amd64 image gets an incompressible layer this large
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    tamper: bool = False
    index_digest: str = ""
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    arches: tuple[str, ...] = ("amd64", "arm64")

    def __post_init__(self) -> None:
        base = _layer({"bin/sh": b"#!busybox\n"})
        entries = []
        for arch in self.arches:
            layers = [base, _layer({"usr/local/bin/rclone": f"rclone {TAG} {arch}\n".encode()})]
            if arch == "amd64" and self.big_layer_bytes:
                layers.append(os.urandom(self.big_layer_bytes))
            config = {"architecture": arch, "os": "linux", "config": {
                "Entrypoint": ["rclone"], "WorkingDir": "/data", "Env": ["XDG_CONFIG_HOME=/config"],
                "Labels": {"org.opencontainers.image.version": TAG}}, "rootfs": {"type": "layers", "diff_ids": []}}
            cbytes = json.dumps(config).encode()
            self.blobs[_digest(cbytes)] = cbytes
            for b in layers:
                self.blobs[_digest(b)] = b
            manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": _digest(cbytes), "size": len(cbytes)},
                        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                    "digest": _digest(b), "size": len(b)} for b in layers]}
            mbytes = json.dumps(manifest, indent=2).encode()
            self.manifests[_digest(mbytes)] = (mbytes, OCI_MANIFEST)
            self.configs[arch] = config
            entries.append({"mediaType": OCI_MANIFEST, "digest": _digest(mbytes), "size": len(mbytes),
                            "platform": {"os": "linux", "architecture": arch}})
        attest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
        self.manifests[_digest(attest)] = (attest, OCI_MANIFEST)
        entries.append({"mediaType": OCI_MANIFEST, "digest": _digest(attest), "size": len(attest),
                        "platform": {"os": "unknown", "architecture": "unknown"}})
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, indent=2).encode()
        self.index_digest = _digest(index)
        self.manifests[self.index_digest] = (index, OCI_INDEX)
        self._server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def reference(self) -> str:
        return f"{self.host}/{NAME}:{TAG}@{self.index_digest}"

    def start(self) -> FakeRegistry:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json", **headers: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                registry.requests.append(self.path)
                if self.path.startswith("/token"):
                    return self._send(200, json.dumps({"token": TOKEN}).encode())
                if self.path.startswith("/cdn/"):  # where blobs redirect: refuses a second credential
                    if self.headers.get("Authorization"):
                        return self._send(400, b"only one auth mechanism allowed")
                    body = registry.blobs.get(self.path[len("/cdn/"):])
                    if body is None:
                        return self._send(404, b"{}")
                    if registry.tamper and len(body) > 200:
                        body = body[:-1] + bytes([body[-1] ^ 1])
                    return self._send(200, body, "application/octet-stream")
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    realm = f"http://{registry.host}/token"
                    challenge = f'Bearer realm="{realm}",service="fake",scope="repository:{NAME}:pull"'
                    return self._send(401, b"{}", WWW_Authenticate=challenge)
                prefix = f"/v2/{NAME}/"
                if not self.path.startswith(prefix):
                    return self._send(404, b"{}")
                kind, _, digest = self.path[len(prefix):].partition("/")
                if kind == "manifests" and digest in registry.manifests:
                    body, ctype = registry.manifests[digest]
                    return self._send(200, body, ctype)
                if kind == "blobs" and digest in registry.blobs:  # as Docker Hub: a redirect to its CDN
                    return self._send(307, b"", Location=f"http://{registry.host}/cdn/{digest}")
                return self._send(404, b"{}")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
