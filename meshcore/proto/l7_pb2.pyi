# ruff: noqa
# mypy: ignore-errors
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MeshSettings(_message.Message):
    __slots__ = ("path_normalization", "escaped_slashes_action")
    PATH_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    ESCAPED_SLASHES_ACTION_FIELD_NUMBER: _ClassVar[int]
    path_normalization: str
    escaped_slashes_action: str
    def __init__(
        self, path_normalization: _Optional[str] = ..., escaped_slashes_action: _Optional[str] = ...
    ) -> None: ...

class Resource(_message.Message):
    __slots__ = ("kind", "namespace", "name", "json", "mesh")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    MESH_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    name: str
    json: str
    mesh: MeshSettings
    def __init__(
        self,
        kind: _Optional[str] = ...,
        namespace: _Optional[str] = ...,
        name: _Optional[str] = ...,
        json: _Optional[str] = ...,
        mesh: _Optional[_Union[MeshSettings, _Mapping]] = ...,
    ) -> None: ...
