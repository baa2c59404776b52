from splitserve.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "hold_seconds", "prior_output_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    HOLD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParameters
    hold_seconds: float
    prior_output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParameters, _Mapping]] = ..., hold_seconds: _Optional[float] = ..., prior_output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("block_ids", "block_size", "cached_blocks")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    block_size: int
    cached_blocks: int
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ..., block_size: _Optional[int] = ..., cached_blocks: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "decode_node_id", "decode_transport_descriptor", "decode_block_ids", "deadline_seconds", "prior_output_token_ids", "decode_cached_blocks", "decode_address")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DECODE_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_TRANSPORT_DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    DECODE_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParameters
    decode_node_id: str
    decode_transport_descriptor: bytes
    decode_block_ids: _containers.RepeatedScalarFieldContainer[int]
    deadline_seconds: float
    prior_output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    decode_cached_blocks: int
    decode_address: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParameters, _Mapping]] = ..., decode_node_id: _Optional[str] = ..., decode_transport_descriptor: _Optional[bytes] = ..., decode_block_ids: _Optional[_Iterable[int]] = ..., deadline_seconds: _Optional[float] = ..., prior_output_token_ids: _Optional[_Iterable[int]] = ..., decode_cached_blocks: _Optional[int] = ..., decode_address: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "cached_prompt_tokens", "compute_seconds", "transfer_wait_seconds", "finish_reason", "first_text", "charges", "kv_transfer_seconds", "kv_transfer_bytes", "queue_seconds", "prompt_logprobs", "imported_blocks", "imported_bytes")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    FIRST_TEXT_FIELD_NUMBER: _ClassVar[int]
    CHARGES_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    first_token: _inference_pb2.TokenLogprob
    cached_prompt_tokens: int
    compute_seconds: float
    transfer_wait_seconds: float
    finish_reason: _inference_pb2.FinishReason
    first_text: str
    charges: _inference_pb2.ChargeBreakdown
    kv_transfer_seconds: float
    kv_transfer_bytes: int
    queue_seconds: float
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.TokenLogprob]
    imported_blocks: int
    imported_bytes: int
    def __init__(self, first_token: _Optional[_Union[_inference_pb2.TokenLogprob, _Mapping]] = ..., cached_prompt_tokens: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., transfer_wait_seconds: _Optional[float] = ..., finish_reason: _Optional[_Union[_inference_pb2.FinishReason, str]] = ..., first_text: _Optional[str] = ..., charges: _Optional[_Union[_inference_pb2.ChargeBreakdown, _Mapping]] = ..., kv_transfer_seconds: _Optional[float] = ..., kv_transfer_bytes: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_inference_pb2.TokenLogprob, _Mapping]]] = ..., imported_blocks: _Optional[int] = ..., imported_bytes: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "first_token", "kv_wait_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token: _inference_pb2.TokenLogprob
    kv_wait_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., first_token: _Optional[_Union[_inference_pb2.TokenLogprob, _Mapping]] = ..., kv_wait_seconds: _Optional[float] = ...) -> None: ...

class SendPrefixRequest(_message.Message):
    __slots__ = ("request_id", "prefill_transport_descriptor", "first_block", "prefill_block_ids", "deadline_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TRANSPORT_DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefill_transport_descriptor: bytes
    first_block: int
    prefill_block_ids: _containers.RepeatedScalarFieldContainer[int]
    deadline_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., prefill_transport_descriptor: _Optional[bytes] = ..., first_block: _Optional[int] = ..., prefill_block_ids: _Optional[_Iterable[int]] = ..., deadline_seconds: _Optional[float] = ...) -> None: ...

class SendPrefixResponse(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "no_kv_writes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NO_KV_WRITES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    no_kv_writes: bool
    def __init__(self, request_id: _Optional[str] = ..., no_kv_writes: _Optional[bool] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
