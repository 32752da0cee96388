"""The one place where a server's address and a port are decided.

Every server pgkd starts (`pgkd serve`, `pgkd teacher serve`, the services' HTTP side) binds to the
host one setting names: `--host` on the commands, `PGKD_HTTP_HOST` for the services. The default is
loopback, `127.0.0.1`: what a person starts on a laptop is not open to the network unless they say so.
The compose file and the Kubernetes manifests set `0.0.0.0` explicitly.

Every port, wherever it is read (an option, a URL, an environment variable), is checked to be
1-65535 here: nothing wraps 70000 into 4464 or takes 0 as "any".
"""
from __future__ import annotations

import ipaddress
import re

from pgkd.errors import Option, UserError

DEFAULT_HOST = "127.0.0.1"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def parse_port(value: object, where) -> int:
    """A TCP port, 1-65535, from an int or its decimal text; UserError naming `where` (a str, or the parts
    of a UserError's message: an Option names the caller's parameter) otherwise.

    The text is ASCII digits and nothing else: no sign, no space, no `0x`, no other script's digits
    (which `int()` and `str.isdigit()` would take)."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text is None or not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise UserError(where, f" {value!r}: not a port (a whole number from 1 to 65535)")
    return int(text)


def parse_address(text: str, where, default_port: int | None = None) -> tuple[str, int]:
    """`HOST:PORT` as (host, port), an IPv6 host in brackets (`[::1]:8000`, host `::1`), the port
    checked by parse_port. A bare HOST takes `default_port`; without one it is refused. The host is
    only required to be there: a name is the resolver's to judge. UserError naming `where` otherwise."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):
            raise UserError(where, f": {text!r} is not HOST:PORT (an IPv6 host in brackets: [::1]:8000)")
        colon, port = rest[:1], rest[1:]
    else:
        host, colon, port = text.partition(":")
    if not host:
        raise UserError(where, f": {text!r} has no host (expected HOST:PORT)")
    if not colon:
        if default_port is None:
            raise UserError(where, f": {text!r} has no port (expected HOST:PORT)")
        return host, default_port
    return host, parse_port(port, (where, ": port"))


def parse_host(value: object, where: str) -> str:
    """An address to bind or reach: an IPv4 or IPv6 address, or a host name; UserError otherwise."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return str(ipaddress.ip_address(text.strip("[]")))
        except ValueError:
            # Not `0`, `00`, `0.0` or `0x0`: the resolver reads such a "name" as an address (0.0.0.0, every
            # interface). A real host name's last label is never all digits.
            numeric = re.fullmatch(r"[0-9]+", text.rsplit(".", 1)[-1]) or text[:2].lower() == "0x"
            if _HOSTNAME.fullmatch(text) and not numeric:
                return text
    raise UserError(f"{where} {value!r}: not a host (an IP address such as 127.0.0.1 or 0.0.0.0, or a host name)")


def port_option(text: str) -> int:
    """argparse `type=` for a port option: argparse turns the error into one line and exit 2."""
    import argparse
    try:
        return parse_port(text, "port")
    except UserError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (a whole number from 1 to 65535)") from None


def host_option(text: str) -> str:
    import argparse
    try:
        return parse_host(text, "host")
    except UserError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a host (an IP address or a host name)") from None


def url_host(host: str) -> str:
    """A host as it goes in a URL: IPv6 in brackets; 0.0.0.0 or :: as loopback (where a local client reaches it)."""
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    return f"[{host}]" if ":" in host else host


def free_ports(count: int, host: str = DEFAULT_HOST) -> list[int]:
    """`count` distinct TCP ports free on `host` now, chosen by the kernel (all held open until all are
    chosen, so none is given twice). A program may take one before its server binds it."""
    import socket
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = DEFAULT_HOST) -> int:
    """One TCP port free on `host` now (free_ports)."""
    return free_ports(1, host)[0]


def triton_host(host: str) -> str:
    """The IPv4 address a Triton server is to listen on, for `host`. tritonserver binds neither HTTP nor gRPC
    on an IPv6 address (and says the port is in use), nor resolves a name (`localhost` became
    255.255.255.255): an IPv6 address is refused, a name is resolved here, each in one line when it fails."""
    import socket
    try:
        if ipaddress.ip_address(host).version == 6:
            raise UserError(Option("host", host), ": Triton listens on IPv4 addresses only (127.0.0.1, or "
                            "0.0.0.0 for every interface)")
        return host
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(Option("host", host), f": no IPv4 address for it ({e}); Triton listens on IPv4 "
                        "addresses only") from None


def require_free_ports(host: str, ports: dict[str, int]) -> None:
    """Refuse (UserError, one line naming the option and the port) a port given to two options, and a
    port that cannot be bound on `host` right now. `ports`: option name -> port, e.g. {"--http-port": 8000}.

    Each port is bound as the servers bind it (SO_REUSEADDR: a port left in TIME_WAIT by a server that
    just stopped is free; one a program listens on is not) and let go at once. A program may still take
    a port between this check and the server's own bind: the server's start then fails, and its caller
    says so."""
    import errno
    import socket
    seen: dict[int, str] = {}
    for option, port in ports.items():
        if port in seen:
            raise UserError(f"{option} {port}: the same port as {seen[port]} (each port must differ)")
        seen[port] = option
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"host {host!r}: no address to listen on ({e})") from None
    for option, port in ports.items():
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address[0], port, *address[2:]))
            except OSError as e:
                why = ("the port is already in use on" if e.errno == errno.EADDRINUSE
                       else f"cannot listen ({e.strerror or e}) on")
                raise UserError(f"{option} {port}: {why} {host}") from None
