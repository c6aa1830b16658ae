"""
Destination URLs (``mllp://host:port?encoding=...``, ``astm+serial:///dev/ttyS0?baudrate=9600``,
``dicom://CALLED@host:port?calling=AE``...): parsed once, no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import posixpath
import re
import socket
from types import MappingProxyType
from typing import Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

import attr

#: How many destination URLs' lane keys L{lane_key} remembers (least recently used go first).
LANE_KEYS = 4096


class DestinationError(ValueError):
    """A destination URL that cannot be used; the message says why, for the caller."""


@attr.s(frozen=True, auto_attribs=True)
class Destination:
    url: str
    scheme: str
    host: str
    port: int | None
    path: str = ""
    user: str | None = None
    #: read-only (a parsed destination is shared: L{parse_destination} caches it)
    params: Mapping[str, str] = attr.ib(factory=lambda: MappingProxyType({}))

    @functools.cached_property
    def key(self) -> str:
        """
        The ordered lane this destination belongs to: one device, one lane.  The device is
        the scheme family (``mllp`` and ``mllps`` are one), the normalised host (see
        L{normalise_host}), the port, the path (serial device) and, for DICOM, the called AE
        title.  Query parameters (``ackTimeout``, ``returnAck``...) are per-message settings
        and never split a device into two lanes.  Computed once per parse (a sender asks
        for it on every message).
        """
        return device_key(self.scheme, self.host, self.port, self.path, self.user)

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name, default)

    def require_port(self) -> int:
        """
        The port of a network destination.  L{parse_destination} already refuses a network URL
        without one; this is for code that needs an C{int} from a destination it did not parse.
        """
        if self.port is None:
            raise DestinationError(f"Destination has no port: {self.url!r}")
        return self.port

    def int_param(self, name: str, default: int) -> int:
        raw = self.params.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise DestinationError(f"{name} must be an integer in {self.scheme}:// destination")

    def float_param(self, name: str, default: float) -> float:
        raw = self.params.get(name)
        if raw is None or raw == "":
            return default
        try:
            return float(raw)
        except ValueError:
            raise DestinationError(f"{name} must be a number in {self.scheme}:// destination")

    def bool_param(self, name: str, default: bool) -> bool:
        raw = self.params.get(name)
        if raw is None or raw == "":
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise DestinationError(f"{name} must be true or false in {self.scheme}:// destination")


#: Schemes that reach the same device as another scheme (the key uses the latter): a port
#: speaks TLS or it does not, so ``mllps://h:1`` and ``mllp://h:1`` can only be one device.
_SCHEME_FAMILY = {"mllps": "mllp"}

#: Schemes whose URL user part names the device's application (DICOM's called AE title).
_USER_IS_DEVICE = frozenset(["dicom", "dicom+tls", "dicoms"])

#: Names that mean this machine's IPv4 loopback (RFC 6761: ``localhost`` and ``*.localhost``).
_LOOPBACK_V4 = "127.0.0.1"

#: Legacy IPv4 spellings that getaddrinfo accepts (``127.1``, ``0x7f.0.0.1``, ``2130706433``).
_IPV4_LEGACY = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


def normalise_host(host: str) -> str:
    """
    The one spelling of a device's host for its lane key, without any name lookup (a lane
    key must be known at once, and a DNS answer can change): lower case, no trailing dot,
    IP literals in their canonical form (IPv4-mapped IPv6 as IPv4, legacy IPv4 forms such as
    ``127.1`` as dotted quad), and ``localhost`` (and ``*.localhost``) as ``127.0.0.1``.
    Other names stay names: a device reached by a name and by its address is two lanes, so
    configure one spelling per device.
    """
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost" or h.endswith(".localhost"):
        return _LOOPBACK_V4
    try:
        ip = ipaddress.ip_address(h.split("%", 1)[0] if ":" in h else h)
    except ValueError:
        ip = None
        if _IPV4_LEGACY.match(h):
            try:
                ip = ipaddress.ip_address(socket.inet_aton(h))
            except OSError:
                ip = None
    if ip is None:
        return h
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    text = str(ip)
    if ":" in h and "%" in h:  # keep an IPv6 zone: fe80::1%eth0 and %eth1 are different links
        text += "%" + h.split("%", 1)[1]
    return text


def device_key(scheme: str, host: str, port: int | None, path: str = "",
               user: str | None = None) -> str:
    """The lane key of a device from its parts (see L{Destination.key})."""
    scheme = scheme.lower()
    family = _SCHEME_FAMILY.get(scheme, scheme)
    if scheme.endswith("+serial"):
        return f"{family}://{posixpath.normpath(path)}"
    host = normalise_host(host)
    if ":" in host:
        host = f"[{host}]"
    who = f"{user.strip()}@" if user and family in _USER_IS_DEVICE else ""
    where = f"{host}:{port}" if port is not None else host
    tail = path.rstrip("/")
    return f"{family}://{who}{where}{tail}"


@functools.lru_cache(maxsize=LANE_KEYS)
def lane_key(remote: str) -> str:
    """
    The lane key of a destination URL; a URL that does not parse is its own lane (it fails
    at once when delivered, and must not hold up any device's lane).

    Remembered for the last L{LANE_KEYS} URLs: a pure function of its text, asked several
    times per push on both sides (the lane, repeats, metrics), and its parse (host
    normalisation through L{ipaddress}) was a tenth of the relay's time per push.
    """
    try:
        return parse_destination(remote, needs_port=False).key
    except DestinationError:
        return remote


#: URLs longer than this are parsed every time instead of cached (the cache stays small).
_CACHED_URL = 512


def parse_destination(url: str, *, needs_port: bool = True) -> Destination:
    """
    Split C{url} into its parts.  Serial schemes (``...+serial``) carry a device path instead
    of host and port.  The result is immutable and cached (a push's destination is parsed by
    the relay's checks, its lane, its metrics and the agent's dispatch: one parse serves
    them all); a URL that does not parse raises every time.
    """
    if not isinstance(url, str) or "://" not in url:
        raise DestinationError(f"Destination is not a URL: {url!r}")
    if len(url) <= _CACHED_URL:
        return _parse_cached(url, needs_port)
    return _parse(url, needs_port)


@functools.lru_cache(maxsize=4096)
def _parse_cached(url: str, needs_port: bool) -> Destination:
    return _parse(url, needs_port)


def _parse(url: str, needs_port: bool) -> Destination:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme:
        raise DestinationError(f"Destination has no scheme: {url!r}")
    params = MappingProxyType(dict(parse_qsl(parts.query, keep_blank_values=True)))
    if scheme.endswith("+serial"):
        path = unquote(parts.path)
        if not path:
            raise DestinationError(f"Serial destination has no device path: {url!r}")
        return Destination(url=url, scheme=scheme, host="", port=None, path=path, params=params)
    try:
        port = parts.port
    except ValueError:
        raise DestinationError(f"Destination has an invalid port: {url!r}")
    host = parts.hostname or ""
    if not host:
        raise DestinationError(f"Destination has no host: {url!r}")
    if needs_port and port is None:
        raise DestinationError(f"Destination has no port: {url!r}")
    user = unquote(parts.username) if parts.username else None
    return Destination(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        path=unquote(parts.path),
        user=user,
        params=params,
    )
