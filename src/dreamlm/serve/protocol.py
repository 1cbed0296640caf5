"""The wire format: OpenAI's completions and chat-completions requests and responses, with Dream's diffusion settings
as documented extra fields. Requests are strict (no type coercion) and closed: a field the server does not implement
(logprobs, echo, tools, penalties, ...) is refused with a 400 naming it, never ignored."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dreamlm.tokenizer import SURROGATE

# Absolute bounds in the schema; the server's own (configurable, lower) caps are checked per request.
MAX_TOKENS_BOUND = 1 << 20
MAX_N_BOUND = 1024
MAX_STEPS_BOUND = 1 << 20
MAX_SEED = (1 << 63) - 1

Alg = Literal["origin", "maskgit_plus", "topk_margin", "entropy"]
Cache = Literal["none", "prefix", "dual"]


def unicode_text(value: Any) -> Any:
    """`value` unchanged, or ValueError (a 400 naming the field) when a string in it holds a lone UTF-16 surrogate:
    JSON can spell one ("\\ud800"), but it is not text and no tokenizer can encode it."""
    texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] \
        if isinstance(value, list) else []
    for text in texts:
        lone = SURROGATE.search(text)
        if lone:
            raise ValueError(f"holds a lone UTF-16 surrogate ({lone.group(0)!r} at character {lone.start()}); send "
                             "valid Unicode text")
    return value


class StreamOptions(BaseModel):
    """OpenAI's stream options: a final chunk with usage when `include_usage`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class DiffusionFields(BaseModel):
    """Sampling fields shared by both endpoints: OpenAI's, then Dream's (the dreamlm extensions)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="A name from /v1/models.")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="Token sampling temperature; default 0 "
                                         "(argmax), unlike OpenAI's 1, so answers are reproducible by default.")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N_BOUND, description="Answers per prompt (each its own row of one canvas).")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="Makes the answer reproducible; the same "
                                "request with the same seed returns the same tokens, batched or alone.")
    stop: Optional[Union[str, list[str]]] = Field(None, description="Up to 4 strings; the text ends before the "
                                                  "first one.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, description="Accepted for compatibility; not used.")
    # ---- dreamlm extensions ----
    steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS_BOUND, description="Denoising steps (default: one per "
                                 "masked token).")
    alg: Alg = Field("entropy", description="Which masked slots to commit each step.")
    alg_temp: Optional[float] = Field(None, ge=0, description="Randomness of the slot choice.")
    eps: float = Field(1e-3, gt=0, lt=1, description="Final time of the schedule.")
    top_k: Optional[int] = Field(None, ge=1)
    block_length: Optional[int] = Field(None, ge=1, description="Decode in blocks of this many tokens, left to "
                                        "right (steps must be a multiple of the number of blocks).")
    cache: Cache = Field("none", description="Key/value cache across steps: prefix or dual (with block_length).")
    refresh_every: Optional[int] = Field(None, ge=1)
    threshold: Optional[float] = Field(None, gt=0, le=1, description="Also commit every slot whose confidence "
                                       "reaches it (fewer passes).")
    stop_at_eos: bool = Field(False, description="End once the text up to the first EOS is complete.")
    stream_steps: bool = Field(False, description="With stream: also send one `event: dreamlm.step` per "
                               "denoising step with the whole canvas.")

    _unicode = field_validator("*")(unicode_text)  # every text field, the subclasses' (prompt, suffix) included


class CompletionRequest(DiffusionFields):
    """POST /v1/completions. A prompt holding `<|mask|>` / `<|mask:N|>` spans is a template: the spans are filled
    and the text outside them kept (max_tokens and suffix do not apply)."""

    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="Text, a list of texts, token ids, or a list of token-id lists.")
    suffix: Optional[str] = Field(None, description="Text after the answer: the canvas is prompt + max_tokens masks "
                                  "+ suffix (infilling). Without max_tokens, a model with DreamOn's expand/delete "
                                  "states chooses the length (up to 64 tokens).")
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_BOUND, description="Masked slots to fill "
                                      "(default 16).")


class ContentPart(BaseModel):
    """A text part of a chat message's content."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str

    _unicode = field_validator("text")(unicode_text)


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None

    _unicode = field_validator("content", "name")(unicode_text)

    def text(self) -> str:
        """The content as one string."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(DiffusionFields):
    """POST /v1/chat/completions: the messages go through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_BOUND, description="Answer length in tokens "
                                      "(default: the server's cap, within the context).")
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_BOUND, description="Same as max_tokens.")


# ---- responses ---------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    """Token counts, plus the denoising steps and model forward passes the answer took."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    steps: int
    forward_passes: int


class CompletionChoice(BaseModel):
    """One answer. `fills` (template prompts): the text of each mask span."""

    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    fills: Optional[list[str]] = None


class CompletionResponse(BaseModel):
    """A text_completion object."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatAnswer(BaseModel):
    """The assistant message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One chat answer."""

    index: int
    message: ChatAnswer
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatResponse(BaseModel):
    """A chat.completion object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """One served model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dreamlm"
    context_length: int
    chat: bool


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error answer: {"error": {...}}."""

    error: ErrorBody


EVENT_SCHEMA: dict[str, Any] = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string", "description": "absent for chunks; dreamlm.step for per-step frames"},
    "data": {"type": "string", "description": "a JSON chunk (or frame), or [DONE] at the end"},
    "id": {"type": "string"}, "retry": {"type": "integer"}}}  # one server-sent event


def error_json(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "Invalid request (the parameter is named)"), (401, "Missing or wrong API key"),
        (404, "Unknown model"), (413, "Body too large"), (503, "Queue full or shutting down (Retry-After)"),
        (504, "The request took longer than the server's timeout"), (500, "Server error (no traceback)"))
}
