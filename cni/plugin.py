"""Entry point of `ambient-cni`: the CNI plugin is not built yet (issue #3 builds it).

Until then the command refuses to run with a clear message instead of pretending to work.
"""

from __future__ import annotations

import sys


def main() -> int:
    print("ambient-cni: the CNI plugin is not built yet (tracked in issue #3)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
