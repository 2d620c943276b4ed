"""Docker image references and their content digests, read from the image registry's HTTP API.

Runs on the training machine (`python -m cloudtune.registry IMAGE` prints `name@sha256:...`): inside
the container there is no docker to ask, so the digest the tag points to is read from the registry
right after the image was pulled, and recorded in run.json. Standard library only.
"""
from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
# Index (multi-arch) types first: their digest is what `docker pull` records as the RepoDigest.
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
TIMEOUT_SECONDS = 15


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port]; docker.io for Docker Hub
    repository: str  # library/ubuntu, pytorch/pytorch
    tag: str | None
    digest: str | None  # sha256:..., when the reference pins one

    @property
    def name(self) -> str:
        """The reference without tag or digest, as people write it (no docker.io/library/)."""
        if self.registry == DOCKER_HUB:
            return self.repository.removeprefix("library/")
        return f"{self.registry}/{self.repository}"

    def pinned(self, digest: str) -> str:
        return f"{self.name}@{digest}"


def parse_image(reference: str) -> ImageRef:
    """`[registry/]repository[:tag][@sha256:digest]`, with Docker's defaults (docker.io, library/, latest)."""
    rest, _, digest = reference.strip().partition("@")
    if digest and not DIGEST.match(digest):
        raise ValueError(f"'{reference}': the digest after @ must be sha256: and 64 hex digits")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    repository, _, tag = path.rpartition(":") if ":" in path else (path, "", "")
    if not repository or not re.match(r"^[a-z0-9]+([._/-][a-z0-9]+)*$", repository):
        raise ValueError(f"'{reference}' is not a Docker image reference (registry/name:tag or name@sha256:...)")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    return ImageRef(registry=registry, repository=repository, tag=tag or (None if digest else "latest"),
                    digest=digest or None)


def _api_base(registry: str) -> str:
    host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
    # Registries on this machine speak plain HTTP (as docker allows for localhost); all others HTTPS.
    scheme = "http" if host.split(":")[0] in ("localhost", "127.0.0.1") else "https"
    return f"{scheme}://{host}"


def _bearer_token(challenge: str, repository: str) -> str:
    """Anonymous pull token from the realm a 401's `WWW-Authenticate: Bearer realm=...,service=...` names."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    if not challenge.lower().startswith("bearer") or "realm" not in fields:
        raise OSError(f"registry asks for unsupported authentication: {challenge[:80]}")
    query = {"scope": fields.get("scope") or f"repository:{repository}:pull"}
    if "service" in fields:
        query["service"] = fields["service"]
    with urllib.request.urlopen(f"{fields['realm']}?{urllib.parse.urlencode(query)}",
                                timeout=TIMEOUT_SECONDS) as response:
        body = json.loads(response.read())
    return body.get("token") or body["access_token"]


def resolve_digest(reference: str) -> str:
    """The content digest (sha256:...) the reference points to now; pinned references need no network."""
    ref = parse_image(reference)
    if ref.digest:
        return ref.digest
    url = f"{_api_base(ref.registry)}/v2/{ref.repository}/manifests/{ref.tag}"
    headers = {"Accept": MANIFEST_TYPES}
    for _ in range(2):
        request = urllib.request.Request(url, method="HEAD", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                digest = response.headers.get("Docker-Content-Digest", "")
                break
        except urllib.error.HTTPError as exc:
            if exc.code != 401 or "Authorization" in headers:
                raise OSError(f"{url}: HTTP {exc.code}") from None
            headers["Authorization"] = "Bearer " + _bearer_token(exc.headers.get("WWW-Authenticate", ""),
                                                                 ref.repository)
    if not DIGEST.match(digest):
        raise OSError(f"{url}: the registry sent no usable Docker-Content-Digest")
    return digest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cloudtune.registry IMAGE", file=sys.stderr)
        return 2
    try:
        print(parse_image(args[0]).pinned(resolve_digest(args[0])))
    except (OSError, ValueError) as exc:
        print(f"cannot resolve the digest of {args[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
