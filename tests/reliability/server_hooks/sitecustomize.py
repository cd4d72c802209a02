"""Loaded into reliability-test servers through PYTHONPATH; inert unless its variables are set.

MDL_RELIABILITY_HOSTS (JSON {name: [address, ...]}): the process's resolver answers these
names from the table, resolves `localhost` and numeric hosts locally (AI_NUMERICHOST: the
decimal/octal/hex IPv4 forms included), and fails every other name at once, so no DNS query
ever leaves the machine.
MDL_RELIABILITY_CONNECT_LOG (a path): every socket connect() of the process is appended
there as one `host port` line (a Python audit hook), so a test can prove that refused URLs
never produced a connection attempt.
"""

import json
import os
import socket
import sys

_hosts = os.environ.get("MDL_RELIABILITY_HOSTS")
_connect_log = os.environ.get("MDL_RELIABILITY_CONNECT_LOG")

if _hosts is not None:
    _table = {name.lower(): addresses for name, addresses in json.loads(_hosts).items()}
    _real_getaddrinfo = socket.getaddrinfo

    def _table_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name is None or name.lower().rstrip(".") in ("localhost", ""):
            return _real_getaddrinfo(host, port, family, type, proto, flags)
        addresses = _table.get(name.lower().rstrip("."))
        if addresses is None:
            return _real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        port_number = int(port or 0)
        infos = []
        for address in addresses:
            if ":" in address:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port_number, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_number)))
        return infos

    socket.getaddrinfo = _table_getaddrinfo

if _connect_log is not None:

    def _record_connect(event, args):
        if event == "socket.connect" and isinstance(args[1], tuple):
            with open(_connect_log, "a") as log:
                log.write(f"{args[1][0]} {args[1][1]}\n")

    sys.addaudithook(_record_connect)
