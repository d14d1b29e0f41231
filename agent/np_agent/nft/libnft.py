"""A thin wrapper over libnftables (Debian's python3-nftables), JSON in and JSON out.

libnftables runs in-process and talks netlink in whatever network namespace the process is
in, so the same code serves a real node and a test "node" namespace.
"""

from __future__ import annotations

import json
from typing import Any


class NftError(RuntimeError):
    """libnftables refused a command; the message is nft's own."""


class Nft:
    def __init__(self) -> None:
        try:
            import nftables  # Debian's python3-nftables; not on PyPI in a maintained form
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise NftError("the nftables Python bindings are missing: apt-get install "
                           "python3-nftables, and use a venv with --system-site-packages") from e
        self._module = nftables
        self._nft = self._context()

    def _context(self) -> Any:
        ctx = self._module.Nftables()
        ctx.set_json_output(True)
        ctx.set_handle_output(False)
        return ctx

    def transaction(self, commands: list[dict[str, Any]]) -> None:
        """Run commands as ONE netlink batch: all of them take effect, or none."""
        if not commands:
            return
        rc, _, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(err.strip() or f"nft failed with code {rc}")

    def list_chain(self, family: str, table: str, chain: str) -> list[dict[str, Any]] | None:
        """One chain (its rules and their counters) as JSON objects; None when absent."""
        return self._list(f"list chain {family} {table} {chain}")

    def list_table(self, family: str, table: str) -> list[dict[str, Any]] | None:
        """The table as libnftables JSON objects, or None when there is no such table."""
        return self._list(f"list table {family} {table}")

    def _list(self, command: str) -> list[dict[str, Any]] | None:
        """A listing in a throw-away context: libnftables keeps what it listed as its cache,
        and releasing a cache of tens of thousands of elements at the next command cost ~90 ms
        inside what should be a sub-millisecond transaction."""
        rc, out, err = self._context().cmd(command)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(err.strip())
        return json.loads(out)["nftables"]
