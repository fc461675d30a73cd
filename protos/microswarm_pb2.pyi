from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JSON: _ClassVar[Encoding]
    MSGPACK: _ClassVar[Encoding]
JSON: Encoding
MSGPACK: Encoding

class CallRequest(_message.Message):
    __slots__ = ("service", "input", "encoding", "chain", "deadline_s", "client", "input_size", "forwarded_by", "scopes")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_BY_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    service: str
    input: bytes
    encoding: Encoding
    chain: _containers.RepeatedScalarFieldContainer[str]
    deadline_s: float
    client: str
    input_size: int
    forwarded_by: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, service: _Optional[str] = ..., input: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., chain: _Optional[_Iterable[str]] = ..., deadline_s: _Optional[float] = ..., client: _Optional[str] = ..., input_size: _Optional[int] = ..., forwarded_by: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    details: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., details: _Optional[str] = ...) -> None: ...

class CallReply(_message.Message):
    __slots__ = ("status", "result", "encoding", "error", "executed_by", "attempts", "process_time_ms", "cache_hit", "service", "version", "verified", "call_id", "upstream_status", "result_size", "rerunnable", "coordinator")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXECUTED_BY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_SIZE_FIELD_NUMBER: _ClassVar[int]
    RERUNNABLE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    status: str
    result: bytes
    encoding: Encoding
    error: Error
    executed_by: str
    attempts: int
    process_time_ms: float
    cache_hit: bool
    service: str
    version: str
    verified: bool
    call_id: str
    upstream_status: int
    result_size: int
    rerunnable: bool
    coordinator: str
    def __init__(self, status: _Optional[str] = ..., result: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., executed_by: _Optional[str] = ..., attempts: _Optional[int] = ..., process_time_ms: _Optional[float] = ..., cache_hit: _Optional[bool] = ..., service: _Optional[str] = ..., version: _Optional[str] = ..., verified: _Optional[bool] = ..., call_id: _Optional[str] = ..., upstream_status: _Optional[int] = ..., result_size: _Optional[int] = ..., rerunnable: _Optional[bool] = ..., coordinator: _Optional[str] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("call_id",)
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    def __init__(self, call_id: _Optional[str] = ...) -> None: ...

class ResultRequest(_message.Message):
    __slots__ = ("call_id", "wait_s")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    wait_s: float
    def __init__(self, call_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class ResultReply(_message.Message):
    __slots__ = ("call_id", "state", "reply", "service", "age_s", "progress", "progress_message")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    state: str
    reply: CallReply
    service: str
    age_s: float
    progress: float
    progress_message: str
    def __init__(self, call_id: _Optional[str] = ..., state: _Optional[str] = ..., reply: _Optional[_Union[CallReply, _Mapping]] = ..., service: _Optional[str] = ..., age_s: _Optional[float] = ..., progress: _Optional[float] = ..., progress_message: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("call_id",)
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    def __init__(self, call_id: _Optional[str] = ...) -> None: ...

class StreamChunk(_message.Message):
    __slots__ = ("data", "more", "call", "restart")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    more: bool
    call: int
    restart: bool
    def __init__(self, data: _Optional[bytes] = ..., more: _Optional[bool] = ..., call: _Optional[int] = ..., restart: _Optional[bool] = ...) -> None: ...

class CallBatch(_message.Message):
    __slots__ = ("ids", "calls", "authorization", "cancel")
    IDS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    calls: _containers.RepeatedCompositeFieldContainer[CallRequest]
    authorization: str
    cancel: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., calls: _Optional[_Iterable[_Union[CallRequest, _Mapping]]] = ..., authorization: _Optional[str] = ..., cancel: _Optional[_Iterable[int]] = ...) -> None: ...

class ReplyBatch(_message.Message):
    __slots__ = ("ids", "replies")
    IDS_FIELD_NUMBER: _ClassVar[int]
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    replies: _containers.RepeatedCompositeFieldContainer[CallReply]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., replies: _Optional[_Iterable[_Union[CallReply, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("recent_calls", "agents_limit", "agents_offset")
    RECENT_CALLS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    AGENTS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    recent_calls: int
    agents_limit: int
    agents_offset: int
    def __init__(self, recent_calls: _Optional[int] = ..., agents_limit: _Optional[int] = ..., agents_offset: _Optional[int] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_id", "address", "packages", "slots", "running", "last_heartbeat_s", "state", "connected_s", "jobs_done", "jobs_failed", "cpu_percent", "rss_bytes", "mode", "load1", "jobs_cpu_percent", "jobs_rss_bytes", "others_cpu_percent", "limit_stops", "versions", "max_packages", "quarantine_left_s", "jobs_timed_out", "mean_run_ms", "trust", "agreements", "disagreements", "slots_asked", "token_name", "agreements_in_row", "sandbox")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PACKAGES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_S_FIELD_NUMBER: _ClassVar[int]
    JOBS_DONE_FIELD_NUMBER: _ClassVar[int]
    JOBS_FAILED_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    JOBS_CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    JOBS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    OTHERS_CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_STOPS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_PACKAGES_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    JOBS_TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    MEAN_RUN_MS_FIELD_NUMBER: _ClassVar[int]
    TRUST_FIELD_NUMBER: _ClassVar[int]
    AGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_ASKED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_NAME_FIELD_NUMBER: _ClassVar[int]
    AGREEMENTS_IN_ROW_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    address: str
    packages: _containers.RepeatedScalarFieldContainer[str]
    slots: int
    running: int
    last_heartbeat_s: float
    state: str
    connected_s: float
    jobs_done: int
    jobs_failed: int
    cpu_percent: float
    rss_bytes: int
    mode: str
    load1: float
    jobs_cpu_percent: float
    jobs_rss_bytes: int
    others_cpu_percent: float
    limit_stops: int
    versions: _containers.RepeatedScalarFieldContainer[str]
    max_packages: int
    quarantine_left_s: float
    jobs_timed_out: int
    mean_run_ms: float
    trust: str
    agreements: int
    disagreements: int
    slots_asked: int
    token_name: str
    agreements_in_row: int
    sandbox: str
    def __init__(self, agent_id: _Optional[str] = ..., address: _Optional[str] = ..., packages: _Optional[_Iterable[str]] = ..., slots: _Optional[int] = ..., running: _Optional[int] = ..., last_heartbeat_s: _Optional[float] = ..., state: _Optional[str] = ..., connected_s: _Optional[float] = ..., jobs_done: _Optional[int] = ..., jobs_failed: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., mode: _Optional[str] = ..., load1: _Optional[float] = ..., jobs_cpu_percent: _Optional[float] = ..., jobs_rss_bytes: _Optional[int] = ..., others_cpu_percent: _Optional[float] = ..., limit_stops: _Optional[int] = ..., versions: _Optional[_Iterable[str]] = ..., max_packages: _Optional[int] = ..., quarantine_left_s: _Optional[float] = ..., jobs_timed_out: _Optional[int] = ..., mean_run_ms: _Optional[float] = ..., trust: _Optional[str] = ..., agreements: _Optional[int] = ..., disagreements: _Optional[int] = ..., slots_asked: _Optional[int] = ..., token_name: _Optional[str] = ..., agreements_in_row: _Optional[int] = ..., sandbox: _Optional[str] = ...) -> None: ...

class SchedulerInfo(_message.Message):
    __slots__ = ("queue_depth", "queue_limit", "queue_wait_s", "queue_wait_p50_ms", "queue_wait_p99_ms", "local_slots", "local_running", "max_attempts", "retries_total", "hedges_total", "late_results_total", "outcome_unknown_total", "quarantines_total", "overloaded_total", "offloaded_total", "local_total", "staged_total")
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_P99_MS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HEDGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LATE_RESULTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_UNKNOWN_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUARANTINES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OVERLOADED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OFFLOADED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STAGED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    queue_depth: int
    queue_limit: int
    queue_wait_s: float
    queue_wait_p50_ms: float
    queue_wait_p99_ms: float
    local_slots: int
    local_running: int
    max_attempts: int
    retries_total: int
    hedges_total: int
    late_results_total: int
    outcome_unknown_total: int
    quarantines_total: int
    overloaded_total: int
    offloaded_total: int
    local_total: int
    staged_total: int
    def __init__(self, queue_depth: _Optional[int] = ..., queue_limit: _Optional[int] = ..., queue_wait_s: _Optional[float] = ..., queue_wait_p50_ms: _Optional[float] = ..., queue_wait_p99_ms: _Optional[float] = ..., local_slots: _Optional[int] = ..., local_running: _Optional[int] = ..., max_attempts: _Optional[int] = ..., retries_total: _Optional[int] = ..., hedges_total: _Optional[int] = ..., late_results_total: _Optional[int] = ..., outcome_unknown_total: _Optional[int] = ..., quarantines_total: _Optional[int] = ..., overloaded_total: _Optional[int] = ..., offloaded_total: _Optional[int] = ..., local_total: _Optional[int] = ..., staged_total: _Optional[int] = ...) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("name", "version", "digest", "pure", "idempotent", "timeout_s", "builtin", "agents", "revision", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PURE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    pure: bool
    idempotent: bool
    timeout_s: float
    builtin: bool
    agents: int
    revision: int
    description: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., pure: _Optional[bool] = ..., idempotent: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., builtin: _Optional[bool] = ..., agents: _Optional[int] = ..., revision: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class CallRecord(_message.Message):
    __slots__ = ("time", "client", "service", "executed_by", "success", "ms", "error_code", "attempts", "cache_hit", "via_agent")
    TIME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EXECUTED_BY_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    VIA_AGENT_FIELD_NUMBER: _ClassVar[int]
    time: float
    client: str
    service: str
    executed_by: str
    success: bool
    ms: float
    error_code: str
    attempts: int
    cache_hit: bool
    via_agent: str
    def __init__(self, time: _Optional[float] = ..., client: _Optional[str] = ..., service: _Optional[str] = ..., executed_by: _Optional[str] = ..., success: _Optional[bool] = ..., ms: _Optional[float] = ..., error_code: _Optional[str] = ..., attempts: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., via_agent: _Optional[str] = ...) -> None: ...

class VerifyInfo(_message.Message):
    __slots__ = ("mode", "trust_after", "spot_check", "agreed_total", "disagreed_total", "unverified_total", "purged_total")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRUST_AFTER_FIELD_NUMBER: _ClassVar[int]
    SPOT_CHECK_FIELD_NUMBER: _ClassVar[int]
    AGREED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DISAGREED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNVERIFIED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PURGED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    mode: str
    trust_after: int
    spot_check: float
    agreed_total: int
    disagreed_total: int
    unverified_total: int
    purged_total: int
    def __init__(self, mode: _Optional[str] = ..., trust_after: _Optional[int] = ..., spot_check: _Optional[float] = ..., agreed_total: _Optional[int] = ..., disagreed_total: _Optional[int] = ..., unverified_total: _Optional[int] = ..., purged_total: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("coordinator_id", "listen", "uptime_s", "agents", "services", "calls", "dispatch", "placement", "calls_total", "fallbacks_total", "cache_json", "scheduler", "verify", "redacted", "agents_total", "slots_total", "running_total", "routes", "coordinators")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    CALLS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHE_JSON_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    REDACTED_FIELD_NUMBER: _ClassVar[int]
    AGENTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    COORDINATORS_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    listen: str
    uptime_s: float
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    services: _containers.RepeatedCompositeFieldContainer[ServiceInfo]
    calls: _containers.RepeatedCompositeFieldContainer[CallRecord]
    dispatch: str
    placement: str
    calls_total: int
    fallbacks_total: int
    cache_json: bytes
    scheduler: SchedulerInfo
    verify: VerifyInfo
    redacted: bool
    agents_total: int
    slots_total: int
    running_total: int
    routes: _containers.RepeatedCompositeFieldContainer[ServiceInfo]
    coordinators: _containers.RepeatedCompositeFieldContainer[CoordinatorInfo]
    def __init__(self, coordinator_id: _Optional[str] = ..., listen: _Optional[str] = ..., uptime_s: _Optional[float] = ..., agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ..., services: _Optional[_Iterable[_Union[ServiceInfo, _Mapping]]] = ..., calls: _Optional[_Iterable[_Union[CallRecord, _Mapping]]] = ..., dispatch: _Optional[str] = ..., placement: _Optional[str] = ..., calls_total: _Optional[int] = ..., fallbacks_total: _Optional[int] = ..., cache_json: _Optional[bytes] = ..., scheduler: _Optional[_Union[SchedulerInfo, _Mapping]] = ..., verify: _Optional[_Union[VerifyInfo, _Mapping]] = ..., redacted: _Optional[bool] = ..., agents_total: _Optional[int] = ..., slots_total: _Optional[int] = ..., running_total: _Optional[int] = ..., routes: _Optional[_Iterable[_Union[ServiceInfo, _Mapping]]] = ..., coordinators: _Optional[_Iterable[_Union[CoordinatorInfo, _Mapping]]] = ...) -> None: ...

class CoordinatorInfo(_message.Message):
    __slots__ = ("id", "listen", "http", "fingerprint", "agents", "slots", "running", "calls_per_s", "uptime_s", "seen_s", "here", "peer", "forwarded", "received")
    ID_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    HTTP_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CALLS_PER_S_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SEEN_S_FIELD_NUMBER: _ClassVar[int]
    HERE_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    id: str
    listen: str
    http: str
    fingerprint: str
    agents: int
    slots: int
    running: int
    calls_per_s: float
    uptime_s: float
    seen_s: float
    here: bool
    peer: str
    forwarded: int
    received: int
    def __init__(self, id: _Optional[str] = ..., listen: _Optional[str] = ..., http: _Optional[str] = ..., fingerprint: _Optional[str] = ..., agents: _Optional[int] = ..., slots: _Optional[int] = ..., running: _Optional[int] = ..., calls_per_s: _Optional[float] = ..., uptime_s: _Optional[float] = ..., seen_s: _Optional[float] = ..., here: _Optional[bool] = ..., peer: _Optional[str] = ..., forwarded: _Optional[int] = ..., received: _Optional[int] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("manifest", "archive", "publisher_signature")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    archive: bytes
    publisher_signature: bytes
    def __init__(self, manifest: _Optional[bytes] = ..., archive: _Optional[bytes] = ..., publisher_signature: _Optional[bytes] = ...) -> None: ...

class PublishReply(_message.Message):
    __slots__ = ("name", "version", "digest", "revision", "unchanged")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    revision: int
    unchanged: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., revision: _Optional[int] = ..., unchanged: _Optional[bool] = ...) -> None: ...

class CacheStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheStatsReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: bytes
    def __init__(self, json: _Optional[bytes] = ...) -> None: ...

class TokenRequest(_message.Message):
    __slots__ = ("grant_type", "client_id", "client_secret", "refresh_token", "scope")
    GRANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    REFRESH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    grant_type: str
    client_id: str
    client_secret: str
    refresh_token: str
    scope: str
    def __init__(self, grant_type: _Optional[str] = ..., client_id: _Optional[str] = ..., client_secret: _Optional[str] = ..., refresh_token: _Optional[str] = ..., scope: _Optional[str] = ...) -> None: ...

class TokenReply(_message.Message):
    __slots__ = ("access_token", "token_type", "expires_in", "scope", "refresh_token")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    REFRESH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    token_type: str
    expires_in: float
    scope: str
    refresh_token: str
    def __init__(self, access_token: _Optional[str] = ..., token_type: _Optional[str] = ..., expires_in: _Optional[float] = ..., scope: _Optional[str] = ..., refresh_token: _Optional[str] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("client_id", "client_secret", "token", "token_type_hint")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_HINT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    client_secret: str
    token: str
    token_type_hint: str
    def __init__(self, client_id: _Optional[str] = ..., client_secret: _Optional[str] = ..., token: _Optional[str] = ..., token_type_hint: _Optional[str] = ...) -> None: ...

class RevokeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("client_id", "name", "scopes", "created", "revoked")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    created: float
    revoked: float
    def __init__(self, client_id: _Optional[str] = ..., name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., created: _Optional[float] = ..., revoked: _Optional[float] = ...) -> None: ...

class CreateClientRequest(_message.Message):
    __slots__ = ("name", "scopes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateClientReply(_message.Message):
    __slots__ = ("client", "client_secret")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    client: ClientInfo
    client_secret: str
    def __init__(self, client: _Optional[_Union[ClientInfo, _Mapping]] = ..., client_secret: _Optional[str] = ...) -> None: ...

class ListClientsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClientsReply(_message.Message):
    __slots__ = ("clients",)
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[ClientInfo]
    def __init__(self, clients: _Optional[_Iterable[_Union[ClientInfo, _Mapping]]] = ...) -> None: ...

class RevokeClientRequest(_message.Message):
    __slots__ = ("client",)
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    client: str
    def __init__(self, client: _Optional[str] = ...) -> None: ...

class RevokeClientReply(_message.Message):
    __slots__ = ("client",)
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    client: ClientInfo
    def __init__(self, client: _Optional[_Union[ClientInfo, _Mapping]] = ...) -> None: ...

class RouteSpec(_message.Message):
    __slots__ = ("name", "url", "method", "input", "timeout_s", "pure", "headers", "schema_json", "description", "cache_ttl_s", "max_response_bytes")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PURE_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CACHE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    method: str
    input: str
    timeout_s: float
    pure: bool
    headers: _containers.ScalarMap[str, str]
    schema_json: str
    description: str
    cache_ttl_s: float
    max_response_bytes: int
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., method: _Optional[str] = ..., input: _Optional[str] = ..., timeout_s: _Optional[float] = ..., pure: _Optional[bool] = ..., headers: _Optional[_Mapping[str, str]] = ..., schema_json: _Optional[str] = ..., description: _Optional[str] = ..., cache_ttl_s: _Optional[float] = ..., max_response_bytes: _Optional[int] = ...) -> None: ...

class RouteInfo(_message.Message):
    __slots__ = ("name", "url", "method", "input", "timeout_s", "pure", "header_names", "schema_json", "description", "cache_ttl_s", "max_response_bytes", "revision", "digest", "applied_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PURE_FIELD_NUMBER: _ClassVar[int]
    HEADER_NAMES_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CACHE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    method: str
    input: str
    timeout_s: float
    pure: bool
    header_names: _containers.RepeatedScalarFieldContainer[str]
    schema_json: str
    description: str
    cache_ttl_s: float
    max_response_bytes: int
    revision: int
    digest: str
    applied_at: float
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., method: _Optional[str] = ..., input: _Optional[str] = ..., timeout_s: _Optional[float] = ..., pure: _Optional[bool] = ..., header_names: _Optional[_Iterable[str]] = ..., schema_json: _Optional[str] = ..., description: _Optional[str] = ..., cache_ttl_s: _Optional[float] = ..., max_response_bytes: _Optional[int] = ..., revision: _Optional[int] = ..., digest: _Optional[str] = ..., applied_at: _Optional[float] = ...) -> None: ...

class ApplyRoutesRequest(_message.Message):
    __slots__ = ("routes", "prune")
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[RouteSpec]
    prune: bool
    def __init__(self, routes: _Optional[_Iterable[_Union[RouteSpec, _Mapping]]] = ..., prune: _Optional[bool] = ...) -> None: ...

class ApplyRoutesReply(_message.Message):
    __slots__ = ("added", "changed", "unchanged", "removed")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    added: _containers.RepeatedScalarFieldContainer[str]
    changed: _containers.RepeatedScalarFieldContainer[str]
    unchanged: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, added: _Optional[_Iterable[str]] = ..., changed: _Optional[_Iterable[str]] = ..., unchanged: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ...) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRoutesReply(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[RouteInfo]
    def __init__(self, routes: _Optional[_Iterable[_Union[RouteInfo, _Mapping]]] = ...) -> None: ...

class RemoveRouteRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveRouteReply(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: RouteInfo
    def __init__(self, route: _Optional[_Union[RouteInfo, _Mapping]] = ...) -> None: ...

class LinkFrame(_message.Message):
    __slots__ = ("agent_hello", "coordinator_hello", "agent_proof", "refusal", "sealed")
    AGENT_HELLO_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_HELLO_FIELD_NUMBER: _ClassVar[int]
    AGENT_PROOF_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    agent_hello: AgentHello
    coordinator_hello: CoordinatorHello
    agent_proof: AgentProof
    refusal: Refusal
    sealed: Sealed
    def __init__(self, agent_hello: _Optional[_Union[AgentHello, _Mapping]] = ..., coordinator_hello: _Optional[_Union[CoordinatorHello, _Mapping]] = ..., agent_proof: _Optional[_Union[AgentProof, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ..., sealed: _Optional[_Union[Sealed, _Mapping]] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("protocol", "agent_id", "agent_key", "ephemeral", "nonce", "slots", "hostname", "software", "max_packages")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_KEY_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_FIELD_NUMBER: _ClassVar[int]
    MAX_PACKAGES_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    agent_id: str
    agent_key: bytes
    ephemeral: bytes
    nonce: bytes
    slots: int
    hostname: str
    software: str
    max_packages: int
    def __init__(self, protocol: _Optional[int] = ..., agent_id: _Optional[str] = ..., agent_key: _Optional[bytes] = ..., ephemeral: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., slots: _Optional[int] = ..., hostname: _Optional[str] = ..., software: _Optional[str] = ..., max_packages: _Optional[int] = ...) -> None: ...

class CoordinatorHello(_message.Message):
    __slots__ = ("coordinator_key", "ephemeral", "nonce", "signature", "suite")
    COORDINATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    coordinator_key: bytes
    ephemeral: bytes
    nonce: bytes
    signature: bytes
    suite: str
    def __init__(self, coordinator_key: _Optional[bytes] = ..., ephemeral: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., suite: _Optional[str] = ...) -> None: ...

class AgentProof(_message.Message):
    __slots__ = ("signature", "join_mac")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    JOIN_MAC_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    join_mac: bytes
    def __init__(self, signature: _Optional[bytes] = ..., join_mac: _Optional[bytes] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("code", "message", "coordinator_key", "signature")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    coordinator_key: bytes
    signature: bytes
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., coordinator_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Sealed(_message.Message):
    __slots__ = ("counter", "ciphertext", "more")
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    counter: int
    ciphertext: bytes
    more: bool
    def __init__(self, counter: _Optional[int] = ..., ciphertext: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class PackageRef(_message.Message):
    __slots__ = ("name", "version", "digest", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    size: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("agent_id", "heartbeat_s", "liveness_s", "max_frame", "coordinator_id", "slots", "publisher_fingerprints")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_S_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    heartbeat_s: float
    liveness_s: float
    max_frame: int
    coordinator_id: str
    slots: int
    publisher_fingerprints: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, agent_id: _Optional[str] = ..., heartbeat_s: _Optional[float] = ..., liveness_s: _Optional[float] = ..., max_frame: _Optional[int] = ..., coordinator_id: _Optional[str] = ..., slots: _Optional[int] = ..., publisher_fingerprints: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Holdings(_message.Message):
    __slots__ = ("packages",)
    PACKAGES_FIELD_NUMBER: _ClassVar[int]
    packages: _containers.RepeatedCompositeFieldContainer[PackageRef]
    def __init__(self, packages: _Optional[_Iterable[_Union[PackageRef, _Mapping]]] = ...) -> None: ...

class PackageData(_message.Message):
    __slots__ = ("ref", "manifest", "signature", "archive", "publisher_signature")
    REF_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ref: PackageRef
    manifest: bytes
    signature: bytes
    archive: bytes
    publisher_signature: bytes
    def __init__(self, ref: _Optional[_Union[PackageRef, _Mapping]] = ..., manifest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., archive: _Optional[bytes] = ..., publisher_signature: _Optional[bytes] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "service", "digest", "input", "deadline_s", "chain", "confirm_start", "staged")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_START_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    service: str
    digest: str
    input: bytes
    deadline_s: float
    chain: _containers.RepeatedScalarFieldContainer[str]
    confirm_start: bool
    staged: str
    def __init__(self, job_id: _Optional[str] = ..., service: _Optional[str] = ..., digest: _Optional[str] = ..., input: _Optional[bytes] = ..., deadline_s: _Optional[float] = ..., chain: _Optional[_Iterable[str]] = ..., confirm_start: _Optional[bool] = ..., staged: _Optional[str] = ...) -> None: ...

class StagedInput(_message.Message):
    __slots__ = ("stage_id", "data", "last", "drop")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    data: bytes
    last: bool
    drop: bool
    def __init__(self, stage_id: _Optional[str] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., drop: _Optional[bool] = ...) -> None: ...

class StartJob(_message.Message):
    __slots__ = ("job_id", "go")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GO_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    go: bool
    def __init__(self, job_id: _Optional[str] = ..., go: _Optional[bool] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("seq", "heartbeat_s")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    seq: int
    heartbeat_s: float
    def __init__(self, seq: _Optional[int] = ..., heartbeat_s: _Optional[float] = ...) -> None: ...

class ToAgent(_message.Message):
    __slots__ = ("welcome", "holdings", "package", "job", "cancel", "ping", "nested_reply", "refusal", "start", "staged_input", "nested_id")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    HOLDINGS_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    NESTED_REPLY_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STAGED_INPUT_FIELD_NUMBER: _ClassVar[int]
    NESTED_ID_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    holdings: Holdings
    package: PackageData
    job: Job
    cancel: Cancel
    ping: Ping
    nested_reply: CallReply
    refusal: Refusal
    start: StartJob
    staged_input: StagedInput
    nested_id: int
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., holdings: _Optional[_Union[Holdings, _Mapping]] = ..., package: _Optional[_Union[PackageData, _Mapping]] = ..., job: _Optional[_Union[Job, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., nested_reply: _Optional[_Union[CallReply, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ..., start: _Optional[_Union[StartJob, _Mapping]] = ..., staged_input: _Optional[_Union[StagedInput, _Mapping]] = ..., nested_id: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("running", "slots", "cpu_percent", "rss_bytes", "load1", "paused", "mode", "jobs_cpu_percent", "jobs_rss_bytes", "others_cpu_percent", "limit_stops", "sandbox")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    JOBS_CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    JOBS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    OTHERS_CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_STOPS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_FIELD_NUMBER: _ClassVar[int]
    running: int
    slots: int
    cpu_percent: float
    rss_bytes: int
    load1: float
    paused: bool
    mode: str
    jobs_cpu_percent: float
    jobs_rss_bytes: int
    others_cpu_percent: float
    limit_stops: int
    sandbox: str
    def __init__(self, running: _Optional[int] = ..., slots: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., load1: _Optional[float] = ..., paused: _Optional[bool] = ..., mode: _Optional[str] = ..., jobs_cpu_percent: _Optional[float] = ..., jobs_rss_bytes: _Optional[int] = ..., others_cpu_percent: _Optional[float] = ..., limit_stops: _Optional[int] = ..., sandbox: _Optional[str] = ...) -> None: ...

class Fetch(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: PackageRef
    def __init__(self, ref: _Optional[_Union[PackageRef, _Mapping]] = ...) -> None: ...

class Installed(_message.Message):
    __slots__ = ("ref", "ok", "error")
    REF_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ref: PackageRef
    ok: bool
    error: str
    def __init__(self, ref: _Optional[_Union[PackageRef, _Mapping]] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job_id", "ok", "output", "error", "run_ms", "agent_fault", "cancelled", "not_started", "output_size")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUN_MS_FIELD_NUMBER: _ClassVar[int]
    AGENT_FAULT_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    NOT_STARTED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    ok: bool
    output: bytes
    error: Error
    run_ms: float
    agent_fault: bool
    cancelled: bool
    not_started: bool
    output_size: int
    def __init__(self, job_id: _Optional[str] = ..., ok: _Optional[bool] = ..., output: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., run_ms: _Optional[float] = ..., agent_fault: _Optional[bool] = ..., cancelled: _Optional[bool] = ..., not_started: _Optional[bool] = ..., output_size: _Optional[int] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("job_id", "fraction", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    fraction: float
    message: str
    def __init__(self, job_id: _Optional[str] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class JobOutput(_message.Message):
    __slots__ = ("job_id", "data", "size")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    data: bytes
    size: int
    def __init__(self, job_id: _Optional[str] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class JobClaim(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class NestedCall(_message.Message):
    __slots__ = ("nested_id", "job_id", "request")
    NESTED_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    nested_id: int
    job_id: str
    request: CallRequest
    def __init__(self, nested_id: _Optional[int] = ..., job_id: _Optional[str] = ..., request: _Optional[_Union[CallRequest, _Mapping]] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class Leaving(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ToCoordinator(_message.Message):
    __slots__ = ("heartbeat", "fetch", "installed", "result", "nested_call", "pong", "leaving", "claim", "progress", "output")
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    NESTED_CALL_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    heartbeat: Heartbeat
    fetch: Fetch
    installed: Installed
    result: JobResult
    nested_call: NestedCall
    pong: Pong
    leaving: Leaving
    claim: JobClaim
    progress: JobProgress
    output: JobOutput
    def __init__(self, heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., fetch: _Optional[_Union[Fetch, _Mapping]] = ..., installed: _Optional[_Union[Installed, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., nested_call: _Optional[_Union[NestedCall, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., leaving: _Optional[_Union[Leaving, _Mapping]] = ..., claim: _Optional[_Union[JobClaim, _Mapping]] = ..., progress: _Optional[_Union[JobProgress, _Mapping]] = ..., output: _Optional[_Union[JobOutput, _Mapping]] = ...) -> None: ...
