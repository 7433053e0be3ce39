"""A DeepSpeed hostfile read once, checked, and turned into the run's node layout.

The format is DeepSpeed's (`deepspeed/launcher/runner.py`): one `HOST slots=N` per line,
`#` comments and blank lines ignored, each host once. The order of the lines is the order
of the nodes: DeepSpeed numbers ranks node by node, so the first host runs ranks
0..slots-1 (rank 0 among them, which writes the record), the next host the following ones.
"""
from __future__ import annotations

import ipaddress
import os
import random
import re
import socket
from dataclasses import dataclass

from gptbench import limits
from gptbench.errors import UserError

# DeepSpeed's own pattern for a hostfile line (launcher/runner.py: _parse_hostfile).
# ASCII digits only: `\d` also matches other scripts' digits, which DeepSpeed's int() reads.
LINE = re.compile(r"^(\S+)\s+slots=([0-9]+)", re.ASCII)
# torch.distributed's and DeepSpeed's default rendezvous port: what a firewall between real
# hosts is opened for. A loopback layout picks a free port instead (several runs at once).
DEFAULT_MASTER_PORT = 29500


def read_hostfile(path: str) -> tuple[tuple[str, int], ...]:
    """((host, slots), ...) in file order; UserError naming `file:line` for a bad line."""
    if not os.path.isfile(path):
        raise UserError(f"--hostfile: {path} not found")
    hosts: dict[str, int] = {}
    text_of_file = limits.read_text(path, "--hostfile", limits.MAX_CONFIG_BYTES)
    for number, line in enumerate(text_of_file.splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = LINE.match(text)
        if not match:
            raise UserError(f"{path}:{number}: expected 'HOST slots=N', got {text[:80]!r}")
        host, digits = match.group(1), match.group(2)
        slots = limits.ascii_int(digits)
        if slots is None or slots > limits.MAX_SLOTS_PER_HOST:
            raise UserError(f"{path}:{number}: {host[:80]} has slots={digits[:20]}; at most "
                            f"{limits.MAX_SLOTS_PER_HOST} per host")
        if slots < 1:
            raise UserError(f"{path}:{number}: {host[:80]} has slots={slots}; each host needs "
                            f"at least one slot")
        if len(host) > 253 or any(ord(c) < 33 or ord(c) == 127 for c in host):
            raise UserError(f"{path}:{number}: {host[:80]!r} is not a host name or address")
        if host in hosts:
            raise UserError(f"{path}:{number}: host {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"{path}: no hosts (expected lines 'HOST slots=N')")
    total = sum(hosts.values())
    if total > limits.MAX_WORLD:
        raise UserError(f"{path}: {total:,} slots in all, at most {limits.MAX_WORLD:,} ranks")
    return tuple(hosts.items())


def is_loopback(host: str) -> bool:
    """A literal loopback address (127.0.0.0/8, ::1, also IPv4-mapped) or `localhost`."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def non_loopback(addresses) -> list[str]:
    """The addresses that are not loopback: traffic to them could leave the machine."""
    return sorted({a for a in addresses if not is_loopback(a)})


@dataclass(frozen=True)
class Layout:
    """Where a run's ranks go: the hosts in node order, and node 0's rendezvous address."""
    hostfile: str                        # absolute path
    hosts: tuple[tuple[str, int], ...]   # (host, slots) in node order
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return sum(slots for _, slots in self.hosts)

    @property
    def names(self) -> list[str]:
        return [host for host, _ in self.hosts]

    @property
    def loopback(self) -> bool:
        """Every host and the master are this machine's loopback: the rehearsal on one box."""
        return all(is_loopback(h) for h in self.names + [self.master_addr])

    def rank_hosts(self) -> list[str]:
        """The host of each global rank, as DeepSpeed's launcher numbers them."""
        return [host for host, slots in self.hosts for _ in range(slots)]


def load_layout(path: str, ranks: int | None = None) -> Layout:
    """The layout of a hostfile; `ranks`, when given, must be its slot total.

    The master address is the first host as the hostfile writes it: DeepSpeed would
    otherwise ask that host for `hostname -I` over ssh and take its first address, which is
    rarely the network the ranks should use (and, on one machine, not loopback)."""
    hosts = read_hostfile(path)
    world = sum(slots for _, slots in hosts)
    if ranks is not None and ranks != world:
        raise UserError(f"--ranks={ranks}, but {path} has {world} slot(s) "
                        f"({', '.join(f'{h}: {s}' for h, s in hosts)}); with a hostfile every "
                        f"slot runs one rank")
    master = hosts[0][0]
    loopback = all(is_loopback(h) for h, _ in hosts) and is_loopback(master)
    return Layout(os.path.abspath(path), hosts, master,
                  loopback_port() if loopback else DEFAULT_MASTER_PORT)


def loopback_port() -> int:
    """A port free now on 127.0.0.1, below the kernel's ephemeral range.

    Rank 0 listens on it only after the whole ssh and import chain (tens of seconds on a
    busy machine); a port from the ephemeral range (what binding port 0 returns) can be
    handed to some other process's connection meanwhile, and rank 0 then fails with
    EADDRINUSE (seen here). Ports below the range are never handed out implicitly."""
    low = ephemeral_low()
    for port in random.sample(range(max(1024, low - 10000), low), 100):
        try:
            socket.create_server(("127.0.0.1", port)).close()
            return port
        except OSError:
            continue
    raise UserError(f"no free port on 127.0.0.1 between {max(1024, low - 10000)} and {low}")


def ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The first port of the kernel's ephemeral range (Linux default 32768)."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
