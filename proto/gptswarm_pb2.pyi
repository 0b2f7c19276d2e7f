from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReducerNode(_message.Message):
    __slots__ = ("peer_id", "maddrs", "name")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    name: str
    def __init__(self, peer_id: _Optional[str] = ..., maddrs: _Optional[_Iterable[str]] = ..., name: _Optional[str] = ...) -> None: ...

class RegisterReducerRequest(_message.Message):
    __slots__ = ("protocol_version", "name", "credential", "peer_id", "maddrs", "software_version")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    name: str
    credential: str
    peer_id: str
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    software_version: str
    def __init__(self, protocol_version: _Optional[int] = ..., name: _Optional[str] = ..., credential: _Optional[str] = ..., peer_id: _Optional[str] = ..., maddrs: _Optional[_Iterable[str]] = ..., software_version: _Optional[str] = ...) -> None: ...

class RegisterReducerResponse(_message.Message):
    __slots__ = ("session", "run_id", "averaging_prefix", "compression", "aggregation", "topk_fraction", "model_config_json", "sender_timeout", "averaging_timeout", "coordinator_peer_id")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_PREFIX_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    TOPK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SENDER_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    session: str
    run_id: str
    averaging_prefix: str
    compression: str
    aggregation: str
    topk_fraction: float
    model_config_json: str
    sender_timeout: float
    averaging_timeout: float
    coordinator_peer_id: str
    def __init__(self, session: _Optional[str] = ..., run_id: _Optional[str] = ..., averaging_prefix: _Optional[str] = ..., compression: _Optional[str] = ..., aggregation: _Optional[str] = ..., topk_fraction: _Optional[float] = ..., model_config_json: _Optional[str] = ..., sender_timeout: _Optional[float] = ..., averaging_timeout: _Optional[float] = ..., coordinator_peer_id: _Optional[str] = ...) -> None: ...

class ReductionRequest(_message.Message):
    __slots__ = ("after_round", "first", "round", "weights_of", "wait")
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_OF_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    after_round: int
    first: bool
    round: int
    weights_of: bool
    wait: float
    def __init__(self, after_round: _Optional[int] = ..., first: _Optional[bool] = ..., round: _Optional[int] = ..., weights_of: _Optional[bool] = ..., wait: _Optional[float] = ...) -> None: ...

class ReductionMember(_message.Message):
    __slots__ = ("peer_id", "worker_id", "weight", "final")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    worker_id: str
    weight: int
    final: bool
    def __init__(self, peer_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., weight: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class Reduction(_message.Message):
    __slots__ = ("found", "round", "group_id", "reducers", "index", "members")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    REDUCERS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    round: int
    group_id: bytes
    reducers: _containers.RepeatedCompositeFieldContainer[ReducerNode]
    index: int
    members: _containers.RepeatedCompositeFieldContainer[ReductionMember]
    def __init__(self, found: _Optional[bool] = ..., round: _Optional[int] = ..., group_id: _Optional[bytes] = ..., reducers: _Optional[_Iterable[_Union[ReducerNode, _Mapping]]] = ..., index: _Optional[int] = ..., members: _Optional[_Iterable[_Union[ReductionMember, _Mapping]]] = ...) -> None: ...

class ReductionReport(_message.Message):
    __slots__ = ("round", "ok", "error", "outcome_json")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_JSON_FIELD_NUMBER: _ClassVar[int]
    round: int
    ok: bool
    error: str
    outcome_json: str
    def __init__(self, round: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., outcome_json: _Optional[str] = ...) -> None: ...

class ReductionReportResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version", "token", "name", "device", "peer_id", "software_version", "worker_id", "worker_secret")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECRET_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    token: str
    name: str
    device: str
    peer_id: str
    software_version: str
    worker_id: str
    worker_secret: str
    def __init__(self, protocol_version: _Optional[int] = ..., token: _Optional[str] = ..., name: _Optional[str] = ..., device: _Optional[str] = ..., peer_id: _Optional[str] = ..., software_version: _Optional[str] = ..., worker_id: _Optional[str] = ..., worker_secret: _Optional[str] = ...) -> None: ...

class RegisterPeerRequest(_message.Message):
    __slots__ = ("peer_id",)
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    def __init__(self, peer_id: _Optional[str] = ...) -> None: ...

class RegisterPeerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("worker_id", "session", "run_id", "protocol_version", "worker_secret", "session_ttl")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECRET_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: str
    run_id: str
    protocol_version: int
    worker_secret: str
    session_ttl: float
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[str] = ..., run_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., worker_secret: _Optional[str] = ..., session_ttl: _Optional[float] = ...) -> None: ...

class RunConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("run_id", "model_config_json", "train_config_json", "tokenizer_json", "shards_json", "tokens_per_round", "max_tokens", "outer_lr", "outer_momentum", "compression", "averaging_prefix", "averaging_timeout", "heartbeat_interval", "coordinator_peer_id", "coordinator_maddrs", "sender_timeout", "topk_fraction", "max_leases")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAIN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTER_LR_FIELD_NUMBER: _ClassVar[int]
    OUTER_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_PREFIX_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_MADDRS_FIELD_NUMBER: _ClassVar[int]
    SENDER_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TOPK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_LEASES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_config_json: str
    train_config_json: str
    tokenizer_json: str
    shards_json: str
    tokens_per_round: int
    max_tokens: int
    outer_lr: float
    outer_momentum: float
    compression: str
    averaging_prefix: str
    averaging_timeout: float
    heartbeat_interval: float
    coordinator_peer_id: str
    coordinator_maddrs: _containers.RepeatedScalarFieldContainer[str]
    sender_timeout: float
    topk_fraction: float
    max_leases: int
    def __init__(self, run_id: _Optional[str] = ..., model_config_json: _Optional[str] = ..., train_config_json: _Optional[str] = ..., tokenizer_json: _Optional[str] = ..., shards_json: _Optional[str] = ..., tokens_per_round: _Optional[int] = ..., max_tokens: _Optional[int] = ..., outer_lr: _Optional[float] = ..., outer_momentum: _Optional[float] = ..., compression: _Optional[str] = ..., averaging_prefix: _Optional[str] = ..., averaging_timeout: _Optional[float] = ..., heartbeat_interval: _Optional[float] = ..., coordinator_peer_id: _Optional[str] = ..., coordinator_maddrs: _Optional[_Iterable[str]] = ..., sender_timeout: _Optional[float] = ..., topk_fraction: _Optional[float] = ..., max_leases: _Optional[int] = ...) -> None: ...

class LeaseTokens(_message.Message):
    __slots__ = ("lease_id", "tokens")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    tokens: int
    def __init__(self, lease_id: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("round", "finished_lease_ids", "lease_tokens")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FINISHED_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    round: int
    finished_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    lease_tokens: _containers.RepeatedCompositeFieldContainer[LeaseTokens]
    def __init__(self, round: _Optional[int] = ..., finished_lease_ids: _Optional[_Iterable[str]] = ..., lease_tokens: _Optional[_Iterable[_Union[LeaseTokens, _Mapping]]] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("granted", "lease_id", "shard_index", "sha256", "tokens", "deadline", "epoch", "reason", "retry_after")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    lease_id: str
    shard_index: int
    sha256: str
    tokens: int
    deadline: float
    epoch: int
    reason: str
    retry_after: float
    def __init__(self, granted: _Optional[bool] = ..., lease_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., sha256: _Optional[str] = ..., tokens: _Optional[int] = ..., deadline: _Optional[float] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ..., retry_after: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("round", "tokens_per_second", "state", "reason", "lease_ids", "bytes_sent", "loss", "lease_tokens")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    round: int
    tokens_per_second: float
    state: str
    reason: str
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    bytes_sent: int
    loss: float
    lease_tokens: _containers.RepeatedCompositeFieldContainer[LeaseTokens]
    def __init__(self, round: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., lease_ids: _Optional[_Iterable[str]] = ..., bytes_sent: _Optional[int] = ..., loss: _Optional[float] = ..., lease_tokens: _Optional[_Iterable[_Union[LeaseTokens, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("round", "phase", "theta_hash", "may_train", "lease_deadline", "expired_lease_ids", "tokens_trained", "finished", "swarm_round_tokens", "swarm_tokens_per_second", "tokens_per_round", "fast_beat_seconds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    THETA_HASH_FIELD_NUMBER: _ClassVar[int]
    MAY_TRAIN_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SWARM_ROUND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SWARM_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    FAST_BEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    theta_hash: str
    may_train: bool
    lease_deadline: float
    expired_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    tokens_trained: int
    finished: bool
    swarm_round_tokens: int
    swarm_tokens_per_second: float
    tokens_per_round: int
    fast_beat_seconds: float
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., theta_hash: _Optional[str] = ..., may_train: _Optional[bool] = ..., lease_deadline: _Optional[float] = ..., expired_lease_ids: _Optional[_Iterable[str]] = ..., tokens_trained: _Optional[int] = ..., finished: _Optional[bool] = ..., swarm_round_tokens: _Optional[int] = ..., swarm_tokens_per_second: _Optional[float] = ..., tokens_per_round: _Optional[int] = ..., fast_beat_seconds: _Optional[float] = ...) -> None: ...

class ShardRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("lease_id", "round", "loss")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    round: int
    loss: float
    def __init__(self, lease_id: _Optional[str] = ..., round: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("accepted", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_ids",)
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class AveragingGroupRequest(_message.Message):
    __slots__ = ("round", "lease_tokens", "replay_commit")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_COMMIT_FIELD_NUMBER: _ClassVar[int]
    round: int
    lease_tokens: _containers.RepeatedCompositeFieldContainer[LeaseTokens]
    replay_commit: str
    def __init__(self, round: _Optional[int] = ..., lease_tokens: _Optional[_Iterable[_Union[LeaseTokens, _Mapping]]] = ..., replay_commit: _Optional[str] = ...) -> None: ...

class AveragingGroup(_message.Message):
    __slots__ = ("state", "group_id", "reducer_peer_id", "reducer_maddrs", "weight", "detail", "retry_after", "reducers")
    STATE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    REDUCER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REDUCER_MADDRS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    REDUCERS_FIELD_NUMBER: _ClassVar[int]
    state: str
    group_id: bytes
    reducer_peer_id: str
    reducer_maddrs: _containers.RepeatedScalarFieldContainer[str]
    weight: int
    detail: str
    retry_after: float
    reducers: _containers.RepeatedCompositeFieldContainer[ReducerNode]
    def __init__(self, state: _Optional[str] = ..., group_id: _Optional[bytes] = ..., reducer_peer_id: _Optional[str] = ..., reducer_maddrs: _Optional[_Iterable[str]] = ..., weight: _Optional[int] = ..., detail: _Optional[str] = ..., retry_after: _Optional[float] = ..., reducers: _Optional[_Iterable[_Union[ReducerNode, _Mapping]]] = ...) -> None: ...

class RoundResultRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class RoundResult(_message.Message):
    __slots__ = ("state", "included", "theta_hash", "detail", "replay")
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    THETA_HASH_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    state: str
    included: bool
    theta_hash: str
    detail: str
    replay: bool
    def __init__(self, state: _Optional[str] = ..., included: _Optional[bool] = ..., theta_hash: _Optional[str] = ..., detail: _Optional[str] = ..., replay: _Optional[bool] = ...) -> None: ...

class ReplayChunk(_message.Message):
    __slots__ = ("round", "data")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    round: int
    data: bytes
    def __init__(self, round: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReplayReceipt(_message.Message):
    __slots__ = ("accepted", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("file", "data", "round", "theta_hash", "size")
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    THETA_HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    file: str
    data: bytes
    round: int
    theta_hash: str
    size: int
    def __init__(self, file: _Optional[str] = ..., data: _Optional[bytes] = ..., round: _Optional[int] = ..., theta_hash: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
