"""
Destination URLs (``mllp://host:port?encoding=...``, ``astm+serial:///dev/ttyS0?baudrate=9600``,
``dicom://CALLED@host:port?calling=AE``...): parsed once, no I/O.
"""

from __future__ import annotations

from typing import Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

import attr


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
    params: Mapping[str, str] = attr.ib(factory=dict)

    @property
    def key(self) -> str:
        """The ordered lane this destination belongs to: one device, one lane."""
        return self.url

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name, default)

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


def parse_destination(url: str, *, needs_port: bool = True) -> Destination:
    """
    Split C{url} into its parts.  Serial schemes (``...+serial``) carry a device path instead
    of host and port.
    """
    if not isinstance(url, str) or "://" not in url:
        raise DestinationError(f"Destination is not a URL: {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme:
        raise DestinationError(f"Destination has no scheme: {url!r}")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
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
