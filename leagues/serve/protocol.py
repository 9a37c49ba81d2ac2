"""Request bodies of the HTTP server (`server.py`), as pydantic models, and their mapping to `SamplingParams`;
`ServerLimits`, what one request may ask of the server beyond its body's schema.

Where it sits: the server's route modules (`api_sglang.py`, `api_openai.py`, `api_admin.py`) parse every
body with a model from here, so FastAPI checks types and ranges, publishes them in the OpenAPI schema,
and answers bad input with a 4xx that names the field.

Decisions:
- Unknown fields are rejected (`extra="forbid"`), so a misspelt knob is an error, not silently ignored.
  The few SGLang/OpenAI fields we accept without acting on them are declared and documented below
  (`skip_special_tokens`, `user`, ...); penalties must stay at their neutral value.
- Ranges are declared on the fields (the OpenAPI schema then carries them) and mirror `SamplingParams`;
  what only the engine can judge (prompt length, token ids in the vocabulary) comes back as 400.
- Like SGLang, a temperature below 1e-5 means greedy: dividing logits by it would overflow.
- Field names follow SGLang's `io_struct.py`/`sampling_params.py` (native API) and OpenAI's API reference.
"""

import json
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from leagues.types import SamplingParams

GREEDY_BELOW = 1e-5


@dataclass(kw_only=True, slots=True)
class ServerLimits:
    """What one request may ask of the server, and how long the server waits on its own checks."""

    max_request_bytes: int = 32 * 2**20
    """Largest request body accepted (larger ones get 413, counted as they arrive)."""
    max_request_sequences: int = 4096
    """Sequences one request may start (prompts x n); more is 400."""
    max_request_tokens: int = 2**22
    """Tokens one request may ask the engine to hold: per sequence its prompt plus its max new tokens (at most
    the context length), summed over prompts x n; more is 400."""
    max_sessions: int = 1024
    """Agent sessions (`/sessions`) open at once; creating one more is 429 until some close."""
    health_generate_timeout: float = 20.0
    """Seconds `/health_generate` waits for its one token before answering 503."""
    weight_group_timeout: float = 300.0
    """Seconds `/init_weights_update_group` waits for the trainer's group to form, and a weight broadcast may
    take; past it the join (or the update) fails."""

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_request_sequences", "max_request_tokens", "max_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name}: must be positive, got {getattr(self, name)}")
        for name in ("health_generate_timeout", "weight_group_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"limits.{name}: must be positive seconds, got {getattr(self, name)}")


MAX_N = 64
MAX_TOP_LOGPROBS = 20
MAX_TOKEN_ID = 2**31 - 1

Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
MinP = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=-1, le=MAX_TOKEN_ID)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
NumTokens = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
NumSamples = Annotated[int, Field(ge=1, le=MAX_N)]
NumTop = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
Neutral = Annotated[float, Field(ge=0, le=0, allow_inf_nan=False, description="not supported: must be 0")]
StopStrings = str | list[Annotated[str, Field(min_length=1)]] | None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _temperature(t: float) -> float:
    return 0.0 if t < GREEDY_BELOW else t


# --- SGLang native ---------------------------------------------------------------------------------


class SGLSamplingParams(Strict):
    """SGLang's `sampling_params` object (the subset leagues implements)."""

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    min_p: MinP = 0.0
    max_new_tokens: NumTokens = 128
    stop: StopStrings = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    n: NumSamples = 1
    seed: Seed | None = None
    sampling_seed: Seed | None = None
    """SGLang's newer name for `seed`; either may be given."""
    skip_special_tokens: bool = True
    """Accepted for SGLang compatibility; text never contains special tokens."""
    spaces_between_special_tokens: bool = True
    """Accepted for SGLang compatibility; no effect."""
    no_stop_trim: bool = False
    """Accepted for SGLang compatibility; the text is always cut before a matched stop string."""
    frequency_penalty: Neutral = 0.0
    presence_penalty: Neutral = 0.0
    repetition_penalty: Annotated[float, Field(ge=1, le=1, description="not supported: must be 1")] = 1.0

    def to_params(
        self, *, top_logprobs: int, return_routed_experts: bool, routed_experts_start: int = 0
    ) -> SamplingParams:
        return SamplingParams(
            temperature=_temperature(self.temperature),
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed if self.seed is not None else self.sampling_seed,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=list(self.stop_token_ids or []),
            stop=_stop_list(self.stop),
            ignore_eos=self.ignore_eos,
            n=self.n,
            top_logprobs=top_logprobs,
            return_routed_experts=return_routed_experts,
            routed_experts_start=routed_experts_start,
        )


class GenerateRequest(Strict):
    """`POST /generate`: one prompt or a batch, as text or token ids."""

    text: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | None
    ) = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SGLSamplingParams = Field(default_factory=SGLSamplingParams)
    return_logprob: bool = False
    top_logprobs_num: NumTop = 0
    logprob_start_len: int = -1
    """Accepted for SGLang compatibility; prompt logprobs are not computed (only -1 is allowed)."""
    return_text_in_logprobs: bool = False
    """Put each token's text as the third element of every logprob entry (else null)."""
    stream: bool = False
    rid: str | list[str] | None = None
    return_routed_experts: bool = False
    """Our extension (as in recent SGLang): `meta_info.routed_experts`, see `api_sglang.py`."""
    routed_experts_start: Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)] = 0
    """Our extension: the routed experts from this token on (multi-turn clients fetch each turn's new rows)."""

    @field_validator("logprob_start_len")
    @classmethod
    def _no_prompt_logprobs(cls, v: int) -> int:
        if v != -1:
            raise ValueError("prompt logprobs are not supported; only -1 is allowed")
        return v

    @field_validator("input_ids")
    @classmethod
    def _not_empty(cls, v):
        if v is not None and (not v or any(isinstance(x, list) and not x for x in v)):
            raise ValueError("a prompt must have at least one token")
        return v


class AbortRequest(Strict):
    rid: str = ""
    abort_all: bool = False


class UpdateWeightsFromDiskRequest(Strict):
    model_path: Annotated[str, Field(min_length=1)]
    """Directory with safetensors in HF names (the same family and shapes as the served model)."""
    load_format: Literal["auto", "safetensors"] | None = None
    weight_version: Annotated[int, Field(ge=0)] | None = None
    """Version stamped on later outputs; default: the current version + 1."""
    abort_all_requests: bool = False
    flush_cache: bool = True
    """Accepted for SGLang compatibility; the prefix cache is always flushed (it holds old keys/values)."""


class MemoryRequest(Strict):
    tags: list[Literal["kv_cache", "weights"]] | None = None
    """What to release: default both (weights are moved to host memory)."""


# --- OpenAI ----------------------------------------------------------------------------------------


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class OpenAISampling(Strict):
    """Fields shared by completions and chat completions, with the usual non-OpenAI extras."""

    model: str | None = None
    """Any name is accepted: the server serves one model."""
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: NumSamples = 1
    stop: StopStrings = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Accepted; not used."""
    frequency_penalty: Neutral = 0.0
    presence_penalty: Neutral = 0.0
    top_k: TopK = -1
    min_p: MinP = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    return_routed_experts: bool = False

    def sampling(self, max_tokens: int, top_logprobs: int) -> SamplingParams:
        return SamplingParams(
            temperature=_temperature(self.temperature),
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            max_new_tokens=max_tokens,
            stop=_stop_list(self.stop),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            n=self.n,
            top_logprobs=top_logprobs,
            return_routed_experts=self.return_routed_experts,
        )


class CompletionRequest(OpenAISampling):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: NumTokens = 16
    logprobs: NumTop | None = None
    """Return this many top logprobs per token (0: only the sampled token's)."""
    echo: Literal[False] = False
    """Only false: prompt logprobs are not computed."""


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: Annotated[str, Field(min_length=1)]
    arguments: str
    """The arguments as a JSON object in a string (OpenAI's encoding)."""


class ToolCallMessage(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    """A tool message: the id of the call it answers."""
    tool_calls: list[ToolCallMessage] | None = None
    """An assistant message: the calls it made."""
    reasoning_content: str | None = None
    """An assistant message's reasoning, for templates that render it."""

    def as_template_input(self) -> dict:
        """The message as chat templates read it: text content, and tool calls with their arguments decoded
        (templates write them back as JSON)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": _arguments(c)}}
                for c in self.tool_calls
            ]
        return message


def _arguments(call: ToolCallMessage) -> dict:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"tool call {call.id}: arguments are not JSON ({err.msg})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {call.id}: arguments must be a JSON object")
    return arguments


class FunctionSpec(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    parameters: dict | None = None
    """A JSON schema of the arguments (passed to the chat template as given)."""
    strict: bool | None = None
    """Accepted; decoding is not constrained to the schema."""


class ToolSpec(Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: dict
    """`{"name": ...}` of the function to call."""


class ChatCompletionRequest(OpenAISampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: NumTokens | None = None
    """Deprecated by OpenAI in favour of `max_completion_tokens`; either works."""
    max_completion_tokens: NumTokens | None = None
    logprobs: bool = False
    top_logprobs: NumTop | None = None
    """Needs `logprobs: true`."""
    tools: list[ToolSpec] | None = None
    """Functions the model may call: rendered by the chat template, calls parsed from the output."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """auto (default with tools): calls are parsed into `tool_calls`; none: the output stays text; "required" or a
    named function: the reply is prefilled with the opening of a call (`leagues.serve.reply.call_prefill`) and
    the model writes the rest (decoding is not constrained: its arguments may not parse)."""
    parallel_tool_calls: bool = True
    """Accepted; every call the model writes is returned."""

    def max_new_tokens(self, default: int) -> int:
        for value in (self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return value
        return default
