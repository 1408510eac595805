"""Entry point of `ambientctl`: the operator CLI is not built yet (issue #6 builds it).

Until then the command refuses to run with a clear message instead of pretending to work.
"""

from __future__ import annotations

import sys


def main() -> int:
    print("ambientctl: the operator CLI is not built yet (tracked in issue #6)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
