from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Session(_message.Message):
    __slots__ = ("id", "state", "anonymous", "created_at", "owner", "bound")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    anonymous: bool
    created_at: float
    owner: str
    bound: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., anonymous: _Optional[bool] = ..., created_at: _Optional[float] = ..., owner: _Optional[str] = ..., bound: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("limit", "handles")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    limit: int
    handles: bool
    def __init__(self, limit: _Optional[int] = ..., handles: _Optional[bool] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "truncated")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    truncated: bool
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("id", "handles")
    ID_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    id: str
    handles: bool
    def __init__(self, id: _Optional[str] = ..., handles: _Optional[bool] = ...) -> None: ...

class RevokeSessionRequest(_message.Message):
    __slots__ = ("id", "handles")
    ID_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    id: str
    handles: bool
    def __init__(self, id: _Optional[str] = ..., handles: _Optional[bool] = ...) -> None: ...

class RevokeSessionResponse(_message.Message):
    __slots__ = ("previous_state",)
    PREVIOUS_STATE_FIELD_NUMBER: _ClassVar[int]
    previous_state: str
    def __init__(self, previous_state: _Optional[str] = ...) -> None: ...

class RevokeSubjectRequest(_message.Message):
    __slots__ = ("issuer", "subject", "handles")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    subject: str
    handles: bool
    def __init__(self, issuer: _Optional[str] = ..., subject: _Optional[str] = ..., handles: _Optional[bool] = ...) -> None: ...

class RevokeSubjectResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: int
    def __init__(self, revoked: _Optional[int] = ...) -> None: ...
