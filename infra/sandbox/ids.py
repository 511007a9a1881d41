"""Who programs run as on the host: an unprivileged uid/gid, never root."""

from __future__ import annotations

import os

# The uid/gid programs have inside the sandbox (bwrap maps it to the host uid below).
SANDBOX_UID = 65534
# The host uid/gid that programs run as when the factory runs as root (never 0).
SANDBOX_UID_ENV = "EVOLFORGE_SANDBOX_UID"
SANDBOX_GID_ENV = "EVOLFORGE_SANDBOX_GID"
DEFAULT_HOST_ID = 65534  # nobody / nogroup


def sandbox_ids() -> tuple[int, int]:
    """The host uid and gid programs run as: never root.

    As root the factory starts bubblewrap as `$EVOLFORGE_SANDBOX_UID`/`$EVOLFORGE_SANDBOX_GID`
    (default 65534, nobody/nogroup) with no supplementary groups; as any other user it runs
    bubblewrap as itself. Raises ValueError when the configured ids are not usable.
    """
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    ids = []
    for name in (SANDBOX_UID_ENV, SANDBOX_GID_ENV):
        raw = os.environ.get(name, str(DEFAULT_HOST_ID))
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
        if not 0 < value < 2**32 - 1:
            raise ValueError(
                f"{name}={value} would not drop root (it must be between 1 and 2^32-2)"
            )
        ids.append(value)
    return ids[0], ids[1]
