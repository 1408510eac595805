"""Errors of the control plane, each carrying the gRPC status code it maps to.

Owns: `ControlPlaneError` (a `MeshError`) and its subclasses. The gRPC servers translate them at
exactly one boundary (`controlplane.grpcserver.abort_with`): ``context.abort(err.code, str(err))``.
Configuration problems are `meshcore.errors.ConfigError` (path names the object and field);
they never reach a gRPC caller, they become per-object warnings.
"""

from __future__ import annotations

import grpc

from meshcore.errors import MeshError


class ControlPlaneError(MeshError):
    """Base of control-plane errors; `code` is the gRPC status sent to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class Unauthenticated(ControlPlaneError):
    """The caller presented no credential, or one we do not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ControlPlaneError):
    """The caller is authenticated but may not do this (e.g. impersonate a workload that has
    no pod on its node)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class InvalidRequest(ControlPlaneError):
    """The request is malformed (bad CSR, bad metadata, unknown type URL)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class SourceError(ControlPlaneError):
    """A config source failed in a way that needs a restart of that source (e.g. the
    Kubernetes API answered 410 Gone: the watch must re-list)."""

    code = grpc.StatusCode.UNAVAILABLE


class Unavailable(ControlPlaneError):
    """The service cannot do this now, through no fault of the caller (e.g. the CA's own chain
    expired); the caller retries with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class Internal(ControlPlaneError):
    """An unexpected failure inside the control plane (a bug); the caller learns nothing more."""

    code = grpc.StatusCode.INTERNAL
