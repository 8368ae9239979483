"""The host's pip settings (index, find-links, CA), read once so lock and build can pass them through.

Values come from `pip config list` (environment variables PIP_* included, which pip shows as `:env:`),
with the environment winning over the config files as it does for pip itself. Only the settings a build needs
are kept; the host's constraint file is deliberately dropped: installs inside an image are hash-locked, so a
host-local cap has nothing left to constrain.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCOPE_ORDER = ("global", "user", "site", ":env:")
"""Later scopes win (pip's own precedence: environment over user over global files)."""


@dataclass(frozen=True)
class HostPip:
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[Path] = field(default_factory=list)
    """Local wheelhouse folders (a find-links that is a URL is not a wheelhouse and is not mounted)."""
    cert: Path | None = None


def _config_list() -> dict[str, dict[str, str]]:
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    scopes: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        scope, _, name = key.rpartition(".")
        scopes.setdefault(scope, {})[name] = value.strip().strip("'\"")
    return scopes


def read_host_pip(enabled: bool = True) -> HostPip:
    """The host's pip settings; `enabled=False` (`--no-host-pip`) gives an empty set."""
    if not enabled:
        return HostPip()
    merged: dict[str, str] = {}
    scopes = _config_list()
    for scope in SCOPE_ORDER:
        merged |= scopes.get(scope, {})
    links = [Path(v) for v in merged.get("find-links", "").split() if "://" not in v and Path(v).is_dir()]
    cert = Path(merged["cert"]) if merged.get("cert") and Path(merged["cert"]).is_file() else None
    # Only http(s) indexes can be reached from inside a build; file:// indexes are host paths.
    extra = [u for u in merged.get("extra-index-url", "").split() if u.startswith(("http://", "https://"))]
    index = merged.get("index-url") if merged.get("index-url", "").startswith(("http://", "https://")) else None
    return HostPip(index_url=index, extra_index_urls=extra, find_links=links, cert=cert)
