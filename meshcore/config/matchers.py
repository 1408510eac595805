"""String matchers of routing objects (VirtualService / HTTPRoute matches) and host matching.

Owns: `MatchKind`, `StringMatcher` (exact, prefix, regex with full-match semantics as RE2 in
Envoy, or presence) and `matcher` (which compiles regexes once), `host_matches`
(VirtualService host wildcards). AuthorizationPolicy strings have their own grammar
(`meshcore.config.authorization.value_match`), and node proxies' wire form is
`meshcore.model.StringMatch`.

Invariant: pure; a `StringMatcher` of kind REGEX always carries its compiled pattern.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from meshcore.errors import ConfigError


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"
    PRESENT = "present"


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatcher:
    """An Istio StringMatch (exact/prefix/regex) or a presence test."""

    kind: MatchKind
    value: str = ""
    ignore_case: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False)
    """Compiled regex (REGEX only); full-match semantics as RE2 in Envoy."""

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.kind is MatchKind.PRESENT:
            return True
        if self.kind is MatchKind.REGEX:
            assert self.pattern is not None
            return self.pattern.fullmatch(text) is not None
        a, b = (text.lower(), self.value.lower()) if self.ignore_case else (text, self.value)
        return a == b if self.kind is MatchKind.EXACT else a.startswith(b)


def matcher(kind: MatchKind, value: str = "", *, ignore_case: bool = False) -> StringMatcher:
    pattern = None
    if kind is MatchKind.REGEX:
        try:
            pattern = re.compile(value, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ConfigError("regex", f"bad regular expression {value!r}: {exc}") from None
    return StringMatcher(kind=kind, value=value, ignore_case=ignore_case, pattern=pattern)


def host_matches(pattern: str, host: str) -> bool:
    """VirtualService host matching: exact, or ``*.example.com`` / ``*`` wildcard."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host
