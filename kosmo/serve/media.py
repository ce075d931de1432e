"""Image parts of API requests: where an image may come from and how big it may be.

- `data:image/...;base64,...` URLs always work. The encoded size is checked before base64 decoding,
  and the pixel count from the image header before any pixel is decoded (decompression bombs).
- `http(s)://` URLs are refused unless the server lists allowed domains. Even then every hop of a
  redirect chain is checked again: its host must be allowed and resolve to public addresses only,
  and the connection goes to the very address that was checked (no second DNS lookup to rebind).
  The download is capped in bytes and in time.
- `file://` URLs are refused unless the server names a local media folder, and then only for files
  that resolve inside it, symlinks followed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image

from kosmo.data.images import decode_image_bytes, open_image
from kosmo.errors import KosmoError

DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),", re.ASCII)


class MediaError(Exception):
    """An image part the server will not take; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_image"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class MediaPolicy:
    max_image_bytes: int = 8 * 2**20
    max_pixels: int = 16_000_000
    min_side: int = 8  # smaller pictures carry nothing a model could see
    allowed_domains: tuple[str, ...] = ()  # empty: remote URLs are refused
    local_root: Path | None = None  # None: file:// URLs are refused
    fetch_timeout: float = 10.0
    max_redirects: int = 3


async def load_image(url: str, policy: MediaPolicy, where: str) -> Image.Image:
    """The RGB picture an image part points to, or a MediaError naming `where` (e.g. messages[0].content[1]).
    Decoding runs in a worker thread, so a big picture never stalls the event loop."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return await asyncio.to_thread(lambda: open_checked(decode_data_url(url, policy, where), where, policy))
    if scheme in ("http", "https"):
        try:
            data = await asyncio.wait_for(fetch(url, policy, where), policy.fetch_timeout)
        except TimeoutError:
            raise MediaError(f"{where}: fetching the image took longer than {policy.fetch_timeout:g} s",
                             code="image_fetch_failed") from None
        return await asyncio.to_thread(open_checked, data, where, policy)
    if scheme == "file":
        return await asyncio.to_thread(open_checked, local_path(url, policy, where), where, policy)
    raise MediaError(f"{where}: image URLs must be data:, http(s): or file: URLs, not {scheme or url[:20]!r}",
                     code="invalid_image_url")


def open_checked(source: bytes | Path, where: str, policy: MediaPolicy) -> Image.Image:
    """Encoded bytes or a file, opened under the policy's caps; KosmoErrors become MediaErrors."""
    try:
        if isinstance(source, bytes):
            img = decode_image_bytes(source, where, policy.max_pixels, policy.max_image_bytes)
        else:
            img = open_image(source, policy.max_pixels, policy.max_image_bytes)
    except KosmoError as e:
        message = str(e)
        if isinstance(source, Path):
            message = message.replace(str(source), where)  # name the request's field, not the server's files
        raise MediaError(message, code="image_too_large" if "too large" in message else "invalid_image") from None
    if min(img.size) < policy.min_side:
        raise MediaError(f"{where}: image is {img.width}x{img.height}; each side must be at least "
                         f"{policy.min_side} pixels")
    return img


def decode_data_url(url: str, policy: MediaPolicy, where: str) -> bytes:
    m = DATA_URL.match(url)
    if not m or ";base64" not in m["params"].lower():
        raise MediaError(f"{where}: a data URL must look like data:image/png;base64,<data>", code="invalid_image_url")
    if m["mime"] and not m["mime"].lower().startswith("image/"):
        raise MediaError(f"{where}: data URL has media type {m['mime']!r}, not an image")
    payload = url[m.end():]
    if len(payload) // 4 * 3 > policy.max_image_bytes:  # refuse before decoding a byte
        raise MediaError(f"{where}: image too large (about {len(payload) // 4 * 3:,} bytes, "
                         f"limit {policy.max_image_bytes:,})", status=413, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{where}: the data URL's base64 is invalid or truncated") from None


def local_path(url: str, policy: MediaPolicy, where: str) -> Path:
    if policy.local_root is None:
        raise MediaError(f"{where}: file:// image URLs are disabled (the server allows them with "
                         f"--allowed-local-media-path DIR)", status=400, code="image_url_not_allowed")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"{where}: file URLs must name a local path", code="image_url_not_allowed")
    root = policy.local_root.resolve()
    path = Path(unquote(parts.path)).resolve()  # symlinks followed before the containment check
    if not path.is_relative_to(root):
        raise MediaError(f"{where}: file is outside the allowed local media folder", code="image_url_not_allowed")
    return path


def resolve_host(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def domain_allowed(host: str, domains: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in domains)


async def fetch(url: str, policy: MediaPolicy, where: str, transport=None, resolve=resolve_host) -> bytes:
    """Downloads an allowed remote image, checking host and address at every redirect hop."""
    if not policy.allowed_domains:
        raise MediaError(f"{where}: remote image URLs are disabled (the server allows them with "
                         f"--allowed-media-domains)", code="image_url_not_allowed")
    async with httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False,
                                 timeout=policy.fetch_timeout) as client:
        for _ in range(policy.max_redirects + 1):
            target = httpx.URL(url)
            if target.scheme not in ("http", "https") or not target.host:
                raise MediaError(f"{where}: redirected to a non-http URL", code="image_url_not_allowed")
            if not domain_allowed(target.host, policy.allowed_domains):
                raise MediaError(f"{where}: host {target.host!r} is not in the allowed media domains",
                                 code="image_url_not_allowed")
            port = target.port or (443 if target.scheme == "https" else 80)
            try:
                addresses = await asyncio.to_thread(resolve, target.host, port)
            except OSError:
                raise MediaError(f"{where}: cannot resolve host {target.host!r}", code="image_fetch_failed") from None
            if not addresses or not all(is_public(a) for a in addresses):
                raise MediaError(f"{where}: host {target.host!r} resolves to a non-public address",
                                 code="image_url_not_allowed")
            # connect to the address just checked; Host header and TLS name stay the requested host's
            pinned = target.copy_with(host=addresses[0])
            headers = {"Host": target.netloc.decode("ascii")}
            try:
                async with client.stream("GET", pinned, headers=headers,
                                         extensions={"sni_hostname": target.host}) as response:
                    if response.is_redirect:
                        url = urljoin(str(target), response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"{where}: fetching the image failed (HTTP {response.status_code})",
                                         code="image_fetch_failed")
                    return await _read_capped(response, policy.max_image_bytes, where)
            except httpx.HTTPError as e:
                raise MediaError(f"{where}: fetching the image failed ({type(e).__name__})",
                                 code="image_fetch_failed") from None
    raise MediaError(f"{where}: more than {policy.max_redirects} redirects", code="image_fetch_failed")


async def _read_capped(response: httpx.Response, max_bytes: int, where: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"{where}: image too large ({int(declared):,} bytes, limit {max_bytes:,})",
                         status=413, code="image_too_large")
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise MediaError(f"{where}: image too large (over {max_bytes:,} bytes)", status=413,
                             code="image_too_large")
    return bytes(data)
