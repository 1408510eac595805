"""X.509 work of a node proxy done outside the proxy's process: the certificate helper.

Owns: the helper process (`python -m meshcore.certhelper`: one JSON batch of requests on stdin,
one JSON list of answers on stdout, then it exits) and both ends of its protocol:
`CertHelper` (the caller's side: batches concurrent requests into one short-lived helper run,
or answers them in-process), `load_local_ca` (the local CA's material, read once at start),
`HelperCAProvider` (static-mode signing by that CA; `local_provider` builds one) and the codec
of a `WorkloadCertificate`.
The requests: `load_ca` (`MeshCA.load_or_create` of a directory), `issue` (key, CSR and
signature by a CA given as PEM material: `MeshCA.from_pem(...).issue`), `csr` (a fresh key and
CSR, `meshcore.ca.generate_csr`) and `chain` (a CA's answer checked by
`WorkloadCertificate.from_chain`).

Why: every X.509 operation (key generation, CSRs, signing, parsing, chain checks) uses the
`cryptography` package, whose Rust library with its own OpenSSL costs ~8.7 MiB of RSS in every
process that imports it (bench/README.md, "Session 7: cryptography out of the worker"). A node
proxy needs it only when it gets a certificate (at start, then every ~12 h per identity); its
TLS runs on the stdlib `ssl` module. So the proxy's workers never import it: this module imports
`meshcore.ca` (and so `cryptography`) only inside the helper process, or in-process when the
caller asks (`CertHelper(in_process=True)`: the waypoint, which imports it anyway, and tests).

Invariants:
- The checks are the in-process ones, run by the same functions (`from_chain`, `MeshCA`); the
  caller installs only a certificate the helper validated, and any failure (the helper's
  answer an error, a helper that crashed, timed out or wrote anything malformed) is a
  `CertificateError`: fail closed, the certificate manager retries with backoff.
- Bounded: at most `MAX_BATCH` requests per helper run, one run at a time per `CertHelper`
  (so at most one helper process per worker), `TIMEOUT` seconds per run (then it is killed).
- Private keys cross only the pipe between the two processes, never argv or a file.
- A batch builds each CA it names once (`answers`): its `issue` requests share it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from meshcore.certs import WorkloadCertificate, utcnow
from meshcore.errors import CertificateError, IdentityError
from meshcore.identity import SpiffeId

MAX_BATCH = 64
"""Requests answered by one helper run (a node's identities at start fit in one or two)."""
TIMEOUT = 30.0
"""Seconds a helper run may take before it is killed and its requests fail."""
HELPER_ARGV = (sys.executable, "-P", "-m", "meshcore.certhelper")
"""``-P``: the caller's working directory is not on the helper's path (a ``meshcore/`` or
``json.py`` there would run with the CA key in hand); `_helper_env` puts this process's own
package root first, so the helper runs the code the caller runs."""
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])

Request = dict[str, Any]
Answer = dict[str, Any]


# --------------------------------------------------------------------------- codec


def _text(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise CertificateError(f"certificate helper: field {key!r} is not a string")
    return value


def cert_to_json(cert: WorkloadCertificate) -> Answer:
    """The fields of a validated certificate (PEMs are ASCII; times in ISO 8601)."""
    return {
        "identity": cert.identity.uri,
        "key": cert.key_pem.decode("ascii"),
        "chain": [p.decode("ascii") for p in cert.chain_pem],
        "presented": [p.decode("ascii") for p in cert.presented_pem],
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "roots": cert.roots_pem.decode("ascii"),
        "serial": cert.serial,
    }


def _ascii(text: str, key: str) -> bytes:
    try:
        return text.encode("ascii")
    except UnicodeError:
        raise CertificateError(f"certificate helper: field {key!r} is not ASCII") from None


def _pem(obj: Mapping[str, Any], key: str) -> bytes:
    return _ascii(_text(obj, key), key)


def _pems(obj: Mapping[str, Any], key: str) -> tuple[bytes, ...]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise CertificateError(f"certificate helper: field {key!r} is not a list of strings")
    return tuple(_ascii(p, key) for p in value)


def _texts(pems: Sequence[bytes]) -> list[str]:
    """PEMs as JSON strings (PEM is ASCII; anything else is refused, not sent)."""
    try:
        return [p.decode("ascii") for p in pems]
    except UnicodeError:
        raise CertificateError("a certificate is not ASCII PEM") from None


def _time(obj: Mapping[str, Any], key: str) -> datetime:
    try:
        when = datetime.fromisoformat(_text(obj, key))
    except ValueError as e:
        raise CertificateError(f"certificate helper: field {key!r}: {e}") from e
    if when.tzinfo is None:
        raise CertificateError(f"certificate helper: field {key!r} has no time zone")
    return when


def cert_from_json(obj: Mapping[str, Any], identity: SpiffeId) -> WorkloadCertificate:
    """`cert_to_json`'s inverse for the certificate asked for `identity`; anything else (another
    identity, a missing or mistyped field) is a CertificateError."""
    try:
        got = SpiffeId.parse(_text(obj, "identity"))
    except IdentityError as e:
        raise CertificateError(f"certificate helper: {e}") from e
    if got != identity:
        raise CertificateError(f"certificate helper answered for {got}, asked for {identity}")
    serial = obj.get("serial")
    chain, presented = _pems(obj, "chain"), _pems(obj, "presented")
    if not isinstance(serial, int) or isinstance(serial, bool) or not chain or not presented:
        raise CertificateError("certificate helper: malformed certificate")
    return WorkloadCertificate(
        identity=got,
        key_pem=_pem(obj, "key"),
        chain_pem=chain,
        presented_pem=presented,
        not_before=_time(obj, "not_before"),
        not_after=_time(obj, "not_after"),
        roots_pem=_pem(obj, "roots"),
        serial=serial,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CAMaterial:
    """A mesh CA as PEM (what `MeshCA.from_pem` rebuilds it from): signing certificate and key,
    the intermediates above it, every trusted root (its own root first)."""

    cert_pem: str
    key_pem: str
    chain_pem: str
    roots_pem: str
    trust_domain: str

    def to_json(self) -> Answer:
        return {
            "cert": self.cert_pem,
            "key": self.key_pem,
            "chain": self.chain_pem,
            "roots": self.roots_pem,
            "trust_domain": self.trust_domain,
        }

    @classmethod
    def of(
        cls,
        cert_pem: bytes,
        key_pem: bytes,
        chain_pem: bytes,
        roots_pem: bytes,
        *,
        trust_domain: str,
    ) -> CAMaterial:
        """From `MeshCA.pem_material()`'s four PEMs."""
        return cls(
            cert_pem=cert_pem.decode("ascii"),
            key_pem=key_pem.decode("ascii"),
            chain_pem=chain_pem.decode("ascii"),
            roots_pem=roots_pem.decode("ascii"),
            trust_domain=trust_domain,
        )

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CAMaterial:
        return cls(
            cert_pem=_text(obj, "cert"),
            key_pem=_text(obj, "key"),
            chain_pem=_text(obj, "chain"),
            roots_pem=_text(obj, "roots"),
            trust_domain=_text(obj, "trust_domain"),
        )


# --------------------------------------------------------------------------- helper side


CAs = dict[tuple[str, ...], Any]
"""The CAs one batch built (`MeshCA` by its material's fields): an `issue` batch of a node's
identities, all by the same CA, parses and checks that CA once, not per request."""


def answers(requests: Sequence[Mapping[str, Any]]) -> list[Answer]:
    """A batch's answers (the helper process's work), the CAs it names built once."""
    cas: CAs = {}
    return [answer(r, cas) for r in requests]


def answer(request: Mapping[str, Any], cas: CAs | None = None) -> Answer:
    """One request's answer: its result, or ``{"error": message}`` (never raises). `cas`: the
    CAs built by the batch so far (`answers`)."""
    try:
        return _answer(request, {} if cas is None else cas)
    except CertificateError as e:
        return {"error": str(e)}
    except Exception as e:  # fail closed: anything unexpected is a refused request
        return {"error": f"{type(e).__name__}: {e}"}


def _identity(request: Mapping[str, Any]) -> SpiffeId:
    return SpiffeId.parse(_text(request, "identity"))


def _ca(material: Mapping[str, Any], cas: CAs) -> Any:
    from meshcore.ca import MeshCA

    fields = ("cert", "key", "chain", "roots", "trust_domain")
    key = tuple(_text(material, f) for f in fields)
    ca = cas.get(key)
    if ca is None:
        ca = cas[key] = MeshCA.from_pem(
            cert_pem=_pem(material, "cert"),
            key_pem=_pem(material, "key"),
            chain_pem=_pem(material, "chain"),
            root_pem=_pem(material, "roots"),
            trust_domain=_text(material, "trust_domain"),
        )
    return ca


def _answer(request: Mapping[str, Any], cas: CAs) -> Answer:
    from meshcore.ca import MeshCA, generate_csr

    op = request.get("op")
    if op == "csr":
        key_pem, csr_pem = generate_csr(_identity(request))
        return {"key": key_pem.decode("ascii"), "csr": csr_pem.decode("ascii")}
    if op == "chain":
        cert = WorkloadCertificate.from_chain(
            _identity(request),
            _pem(request, "key"),
            _pems(request, "chain"),
            _pem(request, "roots"),
        )
        return cert_to_json(cert)
    if op == "issue":
        ca = _ca(request.get("ca") or {}, cas)
        ttl = request.get("ttl")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise CertificateError("issue: ttl is not a number")
        issued = ca.issue(_identity(request), ttl=timedelta(seconds=ttl), now=_time(request, "now"))
        return cert_to_json(issued)
    if op == "load_ca":
        trust_domain = _text(request, "trust_domain")
        loaded = MeshCA.load_or_create(Path(_text(request, "dir")), trust_domain=trust_domain)
        return CAMaterial.of(*loaded.pem_material(), trust_domain=trust_domain).to_json()
    raise CertificateError(f"unknown certificate helper request {op!r}")


def main() -> int:
    """The helper process: a JSON list of requests on stdin, their answers on stdout. It ends
    itself past `TIMEOUT` (SIGALRM): an orphan whose caller was killed does not linger."""
    signal.alarm(int(TIMEOUT) + 1)
    try:
        requests = json.loads(sys.stdin.buffer.read())
    except ValueError as e:
        print(f"certificate helper: unreadable request: {e}", file=sys.stderr)
        return 2
    if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
        print("certificate helper: the request is not a list of objects", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(answers(requests)))
    return 0


# --------------------------------------------------------------------------- caller side


def _answers(out: bytes, count: int) -> list[Answer]:
    try:
        got = json.loads(out)
    except ValueError as e:
        raise CertificateError(f"certificate helper wrote an unreadable answer: {e}") from e
    if not isinstance(got, list) or len(got) != count or not all(isinstance(a, dict) for a in got):
        raise CertificateError("certificate helper answered a different number of requests")
    return got


def _result(reply: Answer) -> Answer:
    error = reply.get("error")
    if error is not None:
        raise CertificateError(str(error))
    return reply


def run_helper_sync(requests: Sequence[Request], *, timeout: float = TIMEOUT) -> list[Answer]:
    """One helper run, blocking (start-up; `run_helper` from the event loop): killed after
    `timeout` seconds."""
    try:
        done = subprocess.run(
            HELPER_ARGV,
            env=_helper_env(),
            input=json.dumps(list(requests)).encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:  # the helper was killed
        raise CertificateError(f"certificate helper took more than {timeout:g} s") from None
    except OSError as e:
        raise CertificateError(f"certificate helper cannot start: {e}") from e
    if done.returncode != 0:
        tail = done.stderr[-500:].decode(errors="replace").strip()
        raise CertificateError(f"certificate helper exited {done.returncode}: {tail}")
    return _answers(done.stdout, len(requests))


def _helper_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": PACKAGE_ROOT + (os.pathsep + path if path else "")}


async def run_helper(requests: Sequence[Request], *, timeout: float = TIMEOUT) -> list[Answer]:
    """`run_helper_sync` in a thread. Not the event loop's subprocess support: uvloop's calls
    fork(), which runs gRPC's fork handlers in a control-plane worker (`ztunnel.workers`: no
    gRPC in a process that forks), and its stdin transport was seen closed before the request
    was written ("the handler is closed"); `subprocess` spawns with vfork, no fork handler."""
    return await asyncio.to_thread(run_helper_sync, requests, timeout=timeout)


def _fail(requests: Sequence[tuple[Request, asyncio.Future[Answer]]], message: str) -> None:
    for _, fut in requests:
        if not fut.done():
            fut.set_exception(CertificateError(message))


class CertHelper:
    """Answers certificate requests: batched into short-lived helper processes (a node proxy's
    workers), or in-process (`in_process=True`: same code, for processes that import
    `cryptography` anyway). Concurrent requests made in one turn of the event loop share a run."""

    def __init__(self, *, in_process: bool = False, timeout: float = TIMEOUT) -> None:
        self.in_process = in_process
        self.timeout = timeout
        self._queue: list[tuple[Request, asyncio.Future[Answer]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.runs = 0
        """Helper processes started (observability, tests)."""

    async def call(self, request: Request) -> Answer:
        """The answer to `request`; CertificateError if it is an error or the helper failed."""
        if self.in_process:
            return _result(answer(request))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Answer] = loop.create_future()
        self._queue.append((request, fut))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name="certificate helper")
        return _result(await fut)

    async def _run(self) -> None:
        batch: list[tuple[Request, asyncio.Future[Answer]]] = []
        try:
            await asyncio.sleep(0)  # the requests of this loop turn join the batch
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                self.runs += 1
                try:
                    answers = await run_helper([r for r, _ in batch], timeout=self.timeout)
                except Exception as e:  # fail closed: every request of the batch fails
                    failed = e if isinstance(e, CertificateError) else None
                    _fail(batch, str(failed or f"certificate helper: {type(e).__name__}: {e}"))
                    continue
                for (_, fut), reply in zip(batch, answers, strict=True):
                    if not fut.done():
                        fut.set_result(reply)
        finally:  # stopped (loop shut down): no request, queued or in flight, waits for ever
            _fail(batch + self._queue, "certificate helper stopped")
            self._queue = []

    async def csr(self, identity: SpiffeId) -> tuple[bytes, bytes]:
        """A fresh key and a CSR for `identity`: (key PEM, CSR PEM)."""
        reply = await self.call({"op": "csr", "identity": identity.uri})
        return _text(reply, "key").encode("ascii"), _text(reply, "csr").encode("ascii")

    async def check(
        self, identity: SpiffeId, key_pem: bytes, chain_pem: Sequence[bytes], roots_pem: bytes
    ) -> WorkloadCertificate:
        """`WorkloadCertificate.from_chain`, by the helper."""
        request = {
            "op": "chain",
            "identity": identity.uri,
            "key": _texts([key_pem])[0],
            "chain": _texts(chain_pem),
            "roots": _texts([roots_pem])[0],
        }
        return cert_from_json(await self.call(request), identity)

    async def issue(
        self, ca: CAMaterial, identity: SpiffeId, *, ttl: timedelta, now: datetime
    ) -> WorkloadCertificate:
        """`MeshCA.issue` by the CA of `ca`, by the helper."""
        request = {
            "op": "issue",
            "ca": ca.to_json(),
            "identity": identity.uri,
            "ttl": ttl.total_seconds(),
            "now": now.isoformat(),
        }
        return cert_from_json(await self.call(request), identity)


def load_local_ca(directory: Path, trust_domain: str) -> CAMaterial:
    """`MeshCA.load_or_create(directory)` by a helper process (blocking: start-up), as PEM."""
    request = {"op": "load_ca", "dir": str(directory), "trust_domain": trust_domain}
    return CAMaterial.from_json(_result(run_helper_sync([request])[0]))


class HelperCAProvider:
    """`LocalCAProvider` of a node proxy: signs with the local CA (static mode), in a helper."""

    def __init__(
        self,
        ca: CAMaterial,
        *,
        ttl: timedelta = timedelta(hours=24),
        clock: Callable[[], datetime] = utcnow,
        helper: CertHelper | None = None,
    ) -> None:
        self.ca = ca
        self.ttl = ttl
        self.clock = clock
        self.helper = helper if helper is not None else CertHelper()

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        return await self.helper.issue(self.ca, identity, ttl=self.ttl, now=self.clock())

    def forget(self, identity: SpiffeId) -> None:
        pass  # nothing kept between fetches


def local_provider(
    directory: Path,
    trust_domain: str,
    *,
    ttl: timedelta,
    clock: Callable[[], datetime] = utcnow,
    helper: CertHelper | None = None,
) -> HelperCAProvider:
    """Static-mode signing by the local CA in `directory` (read once, by a helper), in helpers."""
    return HelperCAProvider(
        load_local_ca(directory, trust_domain), ttl=ttl, clock=clock, helper=helper
    )


if __name__ == "__main__":
    sys.exit(main())
