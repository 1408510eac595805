"""Entry point of `waypoint`: the waypoint (L7 proxy) is not built yet (issue #5 builds it).

Until then the command refuses to run with a clear message instead of pretending to work.
"""

from __future__ import annotations

import sys


def main() -> int:
    print(
        "waypoint: the waypoint (L7 proxy) is not built yet (tracked in issue #5)", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
