"""Who a visitor is, for the rate limit and the log: the TCP peer, or the address a trusted proxy reports.

    trusted = TrustedProxies.parse("10.0.0.0/8,127.0.0.1")     # --forwarded-allow-ips (uvicorn's syntax)
    client_address("10.1.2.3", ["6.6.6.6, 203.0.113.9"], trusted)  # -> "203.0.113.9"

The rules (uvicorn's ``forwarded_allow_ips`` convention, made strict where uvicorn is lenient):
- The TCP peer is the visitor unless the peer is a trusted proxy. With no proxies configured
  (the default off Hugging Face Spaces) X-Forwarded-For is ignored, whoever sends it.
- From a trusted peer, every X-Forwarded-For header is read (several headers count as one list, in
  order), and the RIGHT-most entry that is not itself a trusted proxy is the visitor. Each proxy
  appends the address it saw, so the entries left of that one are whatever the visitor typed.
- ``*`` trusts every peer; the visitor is then the right-most entry (uvicorn takes the left-most,
  which the visitor chooses). Use ``*`` only when nothing but the proxy can reach the app.
- An entry that is not an IP address (garbage, a name, ``unknown``) ends the walk: the visitor is
  the last trusted hop read (or the peer), never the garbage, so made-up values cannot mint identities.
- Addresses are normalised (ports and brackets dropped, IPv4-mapped IPv6 as IPv4), and an IPv6
  visitor is its /64 network, since one household or server can pick any address inside its /64.
No gradio here: callers pass the peer and the header values.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What a Hugging Face Space needs: its proxy reaches the app from the Space's private network (the
# peer is an internal 10.x address) and passes the visitor's address in X-Forwarded-For.
SPACE_PROXIES = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,127.0.0.0/8,::1,fc00::/7"

IPV6_VISITOR_PREFIX = 64


@dataclass(frozen=True)
class TrustedProxies:
    """The peers whose X-Forwarded-For is believed: addresses and networks, or every peer."""

    networks: tuple[IPNetwork, ...] = ()
    everyone: bool = False

    @classmethod
    def parse(cls, spec: str | None) -> "TrustedProxies":
        """A comma list of IPs and CIDR networks, ``*`` for every peer, "" for none; ValueError names a bad entry."""
        entries = [e.strip() for e in (spec or "").split(",") if e.strip()]
        if "*" in entries:
            return cls(everyone=True)
        networks = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.0/8, 127.0.0.1, ::1, *)")\
                    from None
        return cls(networks=tuple(networks))

    def __bool__(self) -> bool:
        return self.everyone or bool(self.networks)

    def __contains__(self, address: IPAddress | None) -> bool:
        if address is None:
            return False
        return self.everyone or any(address.version == n.version and address in n for n in self.networks)


def parse_address(text: str | None) -> IPAddress | None:
    """An IP address from a peer or header entry (``1.2.3.4:80``, ``[2001:db8::1]:443``, ``::ffff:1.2.3.4``), or None."""
    value = (text or "").strip().strip('"')
    if value.startswith("["):
        value = value[1:value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    value = value.split("%", 1)[0]  # an IPv6 zone id is local detail
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def forwarded_chain(values: Iterable[str]) -> list[str]:
    """Every X-Forwarded-For header value, in order, as one list of entries."""
    return [entry.strip() for value in values for entry in str(value).split(",")]


def resolve_client(peer: str | None, forwarded_for: Iterable[str], trusted: TrustedProxies) -> str | None:
    """The visitor's IP address by the rules above (normalised), or None when the peer is no IP address."""
    visitor = parse_address(peer)
    if visitor is None or visitor not in trusted:
        return None if visitor is None else str(visitor)
    for entry in reversed(forwarded_chain(forwarded_for)):
        if not entry:
            continue
        address = parse_address(entry)
        if address is None:
            break  # garbage: the visitor is the last hop we could believe
        visitor = address
        if trusted.everyone or address not in trusted:
            break
    return str(visitor)


def visitor_id(host: str | None) -> str:
    """The identity used for the rate limit and the log: an IPv4 address, an IPv6 /64, or the peer as given."""
    address = parse_address(host)
    if address is None:
        return (host or "").strip() or "unknown"  # a unix socket or a test client: nothing to resolve
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/{IPV6_VISITOR_PREFIX}", strict=False))
    return str(address)


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: TrustedProxies) -> str:
    """The visitor's identity from the TCP peer and the X-Forwarded-For values (see the module docstring)."""
    return visitor_id(resolve_client(peer, forwarded_for, trusted) or peer)
