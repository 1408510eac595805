"""What replaces the modules a node-proxy worker no longer imports behaves as they did (issue 14,
memory; which modules: tests/loopback/test_ztunnel_imports.py).

`meshcore.telemetry.text_exposition` (/metrics without prometheus_client's `exposition`) must
write byte for byte what prometheus_client's `generate_latest` writes (the oracle here), for the
node proxy's own registry and for every kind of family and hostile text a collector can hand it;
`ztunnel.promlib` loads the library's submodules without the package `__init__`, and the
package's names still work (checked in a fresh interpreter: this one has imported everything);
the flags' help formatter has argparse's default width without `shutil` (key files without
`tempfile`: tests/unit/test_tls.py).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)
from prometheus_client.core import (
    GaugeHistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.samples import Timestamp

from meshcore.telemetry import CONTENT_TYPE, text_exposition
from ztunnel.flags import help_formatter
from ztunnel.metrics import ProxyMetrics

HOSTILE = ["back\\slash", "line\nfeed", 'quote"d', "ünï©ødé", "", '{a="b"}', "\\n"]


class Families:
    """A collector of hand-made families: OpenMetrics-only samples, timestamps, label and
    metric names outside the legacy character set."""

    def collect(self) -> list[Metric]:
        odd = Metric("odd_family", "help with \\ and\nnewline", "counter")
        odd.add_sample("odd_family_total", {"a-b": "x", "1st": "y", "__r": "z"}, 1.5)
        odd.add_sample("odd_family_created", {"a-b": "x"}, 1_700_000_000.25)
        odd.add_sample("odd_family_total", {"ok": "v"}, 2, timestamp=1_700_000_000.123)
        odd.add_sample("odd_family_total", {}, 3, timestamp=Timestamp(1_700_000_000, 5_000_000))
        gh = GaugeHistogramMetricFamily("queue_wait", "gauge histogram", labels=["q"])
        gh.add_metric(["a"], [("0.5", 1), ("+Inf", 4)], gsum_value=7.5)
        unknown = UnknownMetricFamily("something", "unknown type", labels=["k"])
        unknown.add_metric(["v"], 42)
        return [odd, gh, unknown]


def filled_registry() -> CollectorRegistry:
    metrics = ProxyMetrics()
    r = metrics.registry
    labels = [HOSTILE[i % len(HOSTILE)] for i in range(len(metrics.opened._labelnames))]
    metrics.opened.labels(*labels).inc()
    metrics.received.labels(*labels).inc(123456789)
    for code in HOSTILE:
        metrics.hbone_refused.labels(code).inc(3)
    metrics.active.labels("inbound").inc()
    metrics.accept_paused.inc()
    g = Gauge("floats", "odd floats", ["v"], registry=r)
    for i, value in enumerate([math.nan, math.inf, -math.inf, 1e20, 1234567.0, 1e-9, -2.5, 0]):
        g.labels(str(i)).set(value)
    h = Histogram("latency_seconds", "a histogram", ["route"], registry=r)
    h.labels('a"b').observe(0.3)
    Summary("sizes", "a summary", registry=r).observe(7)
    Info("build", "an info", registry=r).info({"version": "1\n2"})
    Enum("state", "a stateset", states=["up", "down"], registry=r).state("down")
    r.register(Families())
    return r


class Frozen:
    """The families one collect() of a registry gave (process_* move between two calls)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.families = list(registry.collect())

    def collect(self) -> list[Metric]:
        return self.families


def test_text_exposition_is_generate_latest_byte_for_byte() -> None:
    frozen = Frozen(filled_registry())
    ours = text_exposition(frozen)
    for part in (b'quote\\"d', b"line\\nfeed", b"odd_family_created", b"+Inf", b"NaN"):
        assert part in ours  # the hostile values and odd samples are there
    assert b"# TYPE process_cpu_seconds_total counter" in ours  # the node proxy's registry
    assert ours == generate_latest(frozen)


class Raw:
    """A collector of the families given."""

    def __init__(self, *families: Metric) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def test_name_ending_in_a_line_feed_is_escaped_where_generate_latest_writes_it_raw() -> None:
    """The one deliberate difference: prometheus_client checks names with `re.match(...$)`,
    which passes a trailing line feed, and writes it raw (a line a scraper splits in two)."""
    family = Metric("nl\n", "doc", "gauge")
    family.add_sample("nl\n", {"k\n": "v"}, 1)
    assert text_exposition(Raw(family)) == (b'# HELP nl_ doc\n# TYPE nl_ gauge\nnl_{k_="v"} 1.0\n')
    assert b"nl\n{k\n" in generate_latest(Raw(family))  # the library's raw line feeds


def test_a_failing_metric_is_named_in_the_exception_as_generate_latest_does() -> None:
    family = Metric("bad", "doc", "gauge")
    family.add_sample("bad", {}, "not a number")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="could not convert") as ours:
        text_exposition(Raw(family))
    with pytest.raises(ValueError, match="could not convert") as theirs:
        generate_latest(Raw(family))
    assert ours.value.args[-1] is family
    assert ours.value.args == theirs.value.args


def test_content_type_is_prometheus_clients() -> None:
    assert CONTENT_TYPE == CONTENT_TYPE_LATEST


DEFERRED = """
import json, sys
from ztunnel.promlib import defer_package_init
defer_package_init()
defer_package_init()  # once is enough; a second call changes nothing
from prometheus_client.registry import CollectorRegistry
from ztunnel.metrics import ProxyMetrics
from meshcore.telemetry import text_exposition
m = ProxyMetrics(CollectorRegistry())  # no process_* (they move between two scrapes)
m.accept_paused.inc()
text = text_exposition(m.registry)
from prometheus_client import values  # a submodule: still no package __init__
before = sorted(k for k in sys.modules if k.startswith(("prometheus_client", "http", "email")))
import prometheus_client
odd = [getattr(prometheus_client, n, None) for n in ("a.b", "__wrapped__", "")]
still = "prometheus_client.exposition" in sys.modules  # neither started the package
from prometheus_client import Counter, REGISTRY, generate_latest
from prometheus_client.metrics import Counter as Direct
names = {}
exec("from prometheus_client import *", names)
try:
    prometheus_client.no_such_name
    missing = "found"
except AttributeError:
    missing = "AttributeError"
print(json.dumps({
    "before": before,
    "same_class": Counter is Direct and names["Counter"] is Direct,
    "all": sorted(prometheus_client.__all__) == sorted(k for k in names if k != "__builtins__"),
    "same_text": generate_latest(m.registry) == text,
    "registry": type(REGISTRY).__name__,
    "missing": missing,
    "odd": odd,
    "still": still,
    "after": "prometheus_client.exposition" in sys.modules,
}))
"""


def test_deferred_package_init_runs_on_the_first_package_level_name() -> None:
    """In a fresh interpreter: the node proxy's metrics and /metrics text without the
    package `__init__` (no `exposition`, no `http.*`, no `email`); then the package's own
    names, `import *` and a missing name behave as with an eager import."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DEFERRED)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "prometheus_client.exposition" not in report["before"]
    assert [m for m in report["before"] if m.startswith(("http", "email"))] == []
    assert "prometheus_client.values" in report["before"]
    assert report == {
        "before": report["before"],
        "same_class": True,
        "all": True,
        "same_text": True,
        "registry": "CollectorRegistry",
        "missing": "AttributeError",
        "odd": [None, None, None],
        "still": False,
        "after": True,
    }


RACE = """
import json, sys, threading, time
from ztunnel.promlib import defer_package_init
defer_package_init()
import prometheus_client.metrics  # as a worker has
running = threading.Event()

class Slow:  # the package __init__ is importing `exposition`: hold it there a while
    def find_spec(self, name, path=None, target=None):
        if name == "prometheus_client.exposition":
            running.set()
            time.sleep(0.3)
        return None

sys.meta_path.insert(0, Slow())
errors = []

def ask(wait):
    if wait:
        running.wait(10)
    try:
        from prometheus_client import Counter, generate_latest
        assert Counter is prometheus_client.metrics.Counter and generate_latest
    except BaseException as e:
        errors.append(repr(e))

threads = [threading.Thread(target=ask, args=(i > 0,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(errors))
"""


def test_deferred_package_init_from_many_threads_at_once() -> None:
    """Threads asking for package-level names while another thread runs the package
    `__init__` wait for it and get them (not an ImportError from a half-run `__init__`)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RACE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("columns", ["123", "0", "junk", None])
def test_help_formatter_has_argparses_default_width(
    monkeypatch: pytest.MonkeyPatch, columns: str | None
) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    ours, default = help_formatter("ztunnel"), argparse.HelpFormatter("ztunnel")
    assert (ours._width, ours._max_help_position) == (default._width, default._max_help_position)
