"""Fetching images by URL, safely. Off by default (IMAGESEARCH_FETCH_IMAGE_URLS).

A URL from a caller makes this server open connections on the caller's behalf, so (SSRF):
- only http and https;
- the host name is resolved here and every address must be public: loopback, private, link-local (which holds
  cloud metadata endpoints such as 169.254.169.254), multicast, reserved and unspecified addresses are refused,
  unless the host or address is on the operator's allow-list (IMAGESEARCH_FETCH_ALLOWED_HOSTS);
- the connection goes to the address that was checked (no second DNS lookup a rebinding attack could answer
  differently), with the original host name for the Host header and TLS SNI/certificate checks;
- redirects are followed by hand, at most `max_redirects`, each hop checked the same way;
- the body is streamed and cut off past `max_bytes`; connect and read time out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from imagesearch.errors import FieldViolation, ImageTooLarge, InvalidArgument

_REDIRECTS = (301, 302, 303, 307, 308)
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses it resolves to; raises OSError when it does not resolve.
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, from the system resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class FetchPolicy:
    enabled: bool = False
    max_bytes: int = 10 * 1024 * 1024
    timeout_s: float = 5.0
    max_redirects: int = 3
    # Host names (exact, case-insensitive) and address ranges exempt from the public-address rule.
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    allowed_networks: tuple[IpNetwork, ...] = ()

    @classmethod
    def parse_allow_list(cls, text: str) -> tuple[frozenset[str], tuple[IpNetwork, ...]]:
        """'images.internal, 127.0.0.1, 10.0.0.0/8' -> host names and networks."""
        hosts: set[str] = set()
        networks: list[IpNetwork] = []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower())
        return frozenset(hosts), tuple(networks)


@dataclass(frozen=True)
class Hop:
    """One request of a fetch: where the URL points (its host, and its port or the scheme's default) and the Host
    header that names it as the URL did."""

    parts: SplitResult
    host: str
    port: int
    host_header: str

    @classmethod
    def of(cls, url: str, field: str) -> Hop:
        """Raises InvalidArgument for a URL that is not http(s), names no host or does not parse."""
        try:
            parts = urlsplit(url)
            explicit_port = parts.port  # raises for a port that is not a number in 0-65535
        except ValueError:
            raise InvalidArgument(FieldViolation(field, f"{url!r} is not a valid URL")) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(FieldViolation(field, f"only http and https URLs can be fetched, got {url!r}"))
        host = parts.hostname
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets in a Host header
        return cls(
            parts,
            host,
            explicit_port or (443 if parts.scheme == "https" else 80),
            name if explicit_port is None else f"{name}:{explicit_port}",
        )

    def target(self, address: str) -> str:
        """The URL with its host replaced by `address` (the one that was checked), so nothing resolves it again."""
        literal = f"[{address}]" if ":" in address else address
        return self.parts._replace(netloc=f"{literal}:{self.port}").geturl()


class ImageFetcher:
    def __init__(self, policy: FetchPolicy, *, resolve: Resolve = resolve_host) -> None:
        self.policy = policy
        self._resolve = resolve  # tests give names loopback addresses, and change the answer between lookups
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(policy.timeout_s),
            headers={"User-Agent": "imagesearch/1 (+image fetch)", "Accept": "image/*"},
            trust_env=False,  # never route through an environment proxy that would bypass the address checks
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, field: str) -> bytes:
        """The image bytes at `url`. Raises InvalidArgument (naming `field`) for anything refused or failed."""
        if not self.policy.enabled:
            raise InvalidArgument(
                FieldViolation(field, "fetching images by URL is disabled on this server: send the image bytes")
            )
        try:
            return await asyncio.wait_for(self._follow(url, field), timeout=self.policy.timeout_s * 2)
        except TimeoutError:
            raise InvalidArgument(FieldViolation(field, f"fetching {url} timed out")) from None

    async def _follow(self, url: str, field: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            hop = Hop.of(url, field)
            address = await self._checked_address(hop.host, hop.port, field)
            try:
                async with self._client.stream(
                    "GET", hop.target(address), headers={"Host": hop.host_header}, extensions={"sni_hostname": hop.host}
                ) as response:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise InvalidArgument(FieldViolation(field, f"{url} answered HTTP {response.status_code}"))
                    return await self._read_capped(response, url, field)
            except httpx.HTTPError as exc:
                raise InvalidArgument(FieldViolation(field, f"could not fetch {url}: {type(exc).__name__}")) from None
        raise InvalidArgument(FieldViolation(field, f"more than {self.policy.max_redirects} redirects"))

    async def _read_capped(self, response: httpx.Response, url: str, field: str) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.policy.max_bytes:
            raise ImageTooLarge(
                FieldViolation(field, f"{url} is {declared} bytes; the limit is {self.policy.max_bytes}")
            )
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.policy.max_bytes:
                raise ImageTooLarge(FieldViolation(field, f"{url} exceeds the limit of {self.policy.max_bytes} bytes"))
        return bytes(body)

    async def _checked_address(self, host: str, port: int, field: str) -> str:
        try:
            addresses = await self._resolve(host, port)
        except OSError:
            raise InvalidArgument(FieldViolation(field, f"cannot resolve host {host!r}")) from None
        if not addresses:
            raise InvalidArgument(FieldViolation(field, f"cannot resolve host {host!r}"))
        host_allowed = host.lower() in self.policy.allowed_hosts
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            allowed = host_allowed or any(ip in network for network in self.policy.allowed_networks)
            if not allowed and not _is_public(ip):
                raise InvalidArgument(FieldViolation(field, f"{host} resolves to a non-public address ({ip}); refused"))
        return addresses[0]


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast
