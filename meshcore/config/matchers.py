"""String matchers of routing objects (VirtualService / HTTPRoute matches) and host matching.

Owns: `MatchKind` (the only one), `StringMatcher` (exact, prefix, suffix, regex with full-match
semantics as RE2 in Envoy, or presence) and `matcher` (which compiles regexes once),
`host_matches` (VirtualService host wildcards). AuthorizationPolicy strings are parsed into
`StringMatcher` by `meshcore.config.authorization.value_match` (Istio's wildcard grammar); node
proxies' wire record is `meshcore.model.StringMatch`, of the same `MatchKind`.

Invariant: pure; a `StringMatcher` of kind REGEX always carries its compiled pattern.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from meshcore.errors import ConfigError


class MatchKind(enum.Enum):
    """The one kind of string comparison, for routing and policy matchers alike and for the
    node proxies' wire record (`meshcore.model.StringMatch`, the ``match_type`` oneof of
    ``istio.security.StringMatch``, which has no REGEX)."""

    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    REGEX = "regex"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatcher:
    """One string condition of a route match (Istio StringMatch: exact / prefix / regex, or
    presence) or of an AuthorizationPolicy value (exact / prefix / suffix / presence, path
    templates as REGEX). Presence = the value is there (``None`` never matches)."""

    kind: MatchKind
    value: str = ""
    ignore_case: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False)
    """Compiled regex (REGEX only); full-match semantics as RE2 in Envoy."""

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.kind is MatchKind.PRESENCE:
            return True
        if self.kind is MatchKind.REGEX:
            assert self.pattern is not None
            return self.pattern.fullmatch(text) is not None
        a, b = (text.lower(), self.value.lower()) if self.ignore_case else (text, self.value)
        if self.kind is MatchKind.EXACT:
            return a == b
        if self.kind is MatchKind.PREFIX:
            return a.startswith(b)
        return a.endswith(b)


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
