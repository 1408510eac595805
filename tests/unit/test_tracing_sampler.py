"""meshcore.tracing.Sampler: OpenTelemetry's ParentBased(TraceIdRatioBased) as Istio's
``tracing.sampling`` uses it, and its configuration from the OpenTelemetry environment."""

from __future__ import annotations

import random

import pytest

from meshcore.errors import ConfigError
from meshcore.tracing import Sampler, TraceParent, sampler_from_env
from waypoint.protocol.trace import trace_hop


def ids(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


def test_ratio_decides_new_traces_by_trace_id() -> None:
    trace_ids = ids(4000)
    assert not any(Sampler(ratio=0.0).sampled(t, None) for t in trace_ids)
    assert all(Sampler(ratio=1.0).sampled(t, None) for t in trace_ids)
    quarter = Sampler.from_percent(25)
    n = sum(quarter.sampled(t, None) for t in trace_ids)
    assert 850 <= n <= 1150, n  # 1000 expected; binomial sd ~27
    # Same trace id, same decision at every hop (the low 64 bits against ratio * 2**64).
    assert quarter.sampled("f" * 16 + "0" * 16, None)
    assert not quarter.sampled("0" * 16 + "f" * 16, None)


def test_parent_decision_is_kept() -> None:
    t = ids(1)[0]
    yes, no = TraceParent(t, "1" * 16, "01"), TraceParent(t, "1" * 16, "00")
    assert Sampler(ratio=0.0).sampled(t, yes)
    assert not Sampler(ratio=1.0).sampled(t, no)
    # The bare ratio sampler (OTEL_TRACES_SAMPLER=traceidratio) ignores the parent.
    assert not Sampler(ratio=0.0, parent_based=False).sampled(t, yes)


def test_trace_hop_carries_the_decision() -> None:
    rng = random.Random(5)
    out, *_ = trace_hop(None, rng, Sampler(ratio=0.0))
    assert out.endswith("-00")
    out, *_ = trace_hop(None, rng, Sampler(ratio=1.0))
    assert out.endswith("-01")
    # Other flag bits pass through unchanged (W3C Trace Context §3.2.2.5).
    incoming = f"00-{ids(1)[0]}-{'2' * 16}-03"
    out, *_ = trace_hop(incoming, rng, Sampler(ratio=0.0))
    assert out.endswith("-03")


def test_sampler_from_the_opentelemetry_environment() -> None:
    assert sampler_from_env({}) == Sampler(ratio=1.0, parent_based=True)
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
    assert sampler_from_env(env) == Sampler(ratio=0.01)
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "always_off"}) == Sampler(
        ratio=0.0, parent_based=False
    )
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio"}).parent_based is False


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, "OTEL_TRACES"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "tracing"),
    ],
)
def test_bad_sampler_settings_are_refused(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        sampler_from_env(env)
    assert str(err.value).startswith(field)
    with pytest.raises(ConfigError):
        Sampler.from_percent(101)


def test_node_proxy_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from ztunnel.flags import parse_args

    base = ["--node", "n", "--mesh-config", "m.yaml"]
    settings, _ = parse_args([*base, "--tracing-sampling", "1"])
    assert settings.tracing_sampler == Sampler(ratio=0.01)
    with pytest.raises(SystemExit) as exit_:
        parse_args([*base, "--tracing-sampling", "200"])
    assert exit_.value.code == 2
    assert "200.0% is not within [0, 100]" in capsys.readouterr().err


def test_lab_pods_get_the_labs_collector_and_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    from ambientctl.lab.manifests import PodSpec
    from ambientctl.lab.pods import _pod_env

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://10.0.0.1:4317")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "not-passed")
    pod = PodSpec(
        name="wp",
        namespace="default",
        labels={},
        service_account="wp",
        node="node-1",
        command=("waypoint",),
    )
    env = _pod_env(pod)
    assert sampler_from_env(env) == Sampler(ratio=0.5)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://10.0.0.1:4317"
    assert "OTEL_SERVICE_NAME" not in env
