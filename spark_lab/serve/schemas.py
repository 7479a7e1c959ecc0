"""OpenAI request bodies (pydantic, strict), their validation, and errors in OpenAI's shape."""
from __future__ import annotations

import json
import re
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=getattr(e, "headers", None))


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|dict|list)(\[.*\])?$")


def validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    parts = []
    for p in err["loc"]:                         # ('stop', 'list[str]', 0): drop pydantic's union-member tags
        if isinstance(p, str) and _UNION_TAG.match(p):
            break
        parts.append(str(p))
    param = ".".join(parts) or None
    kind = err["type"]
    code = ("missing_required_parameter" if kind == "missing" else
            "invalid_type" if kind.endswith("_type") else "invalid_value")
    got = "" if kind == "missing" else f" (got {json.dumps(err.get('input'))[:80]})"
    return APIError(400, f"invalid '{param}': {err['msg']}{got}", param=param, code=code)


# ------------------------------------------------------------------------------ request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)   # unknown fields are ignored; "0.5" is not a number


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)                     # extra fields, as llama-server takes them
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    logprobs: bool | int | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    tool_choice: str | dict | None = None     # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    response_format: dict | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None   # gpt-oss's template reads it
    chat_template_kwargs: dict | None = None  # as vLLM and llama-server: {"enable_thinking": false} for Qwen3


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)                  # OpenAI's default for /v1/completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class ImageRequest(_Body):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    steps: int | None = Field(None, ge=1, le=200)             # extra: denoising steps
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    seed: int | None = None
    negative_prompt: str | None = None


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"'{param}' is not supported by this server: {why}", param=param, code="unsupported_parameter")


def sampling_args(r: _Sampling, max_tokens: int | None) -> dict:
    """Validated request fields -> engine arguments."""
    if r.n != 1:
        raise unsupported("n", "one choice per request (send several requests; they are queued)")
    if r.logprobs:
        raise unsupported("logprobs", "log-probabilities are not returned")
    for p in ("presence_penalty", "frequency_penalty"):
        if getattr(r, p):
            raise unsupported(p, "use the extra field 'repetition_penalty' instead")
    stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"'stop' takes up to 4 sequences, got {len(stop)}", param="stop", code="invalid_value")
    s = {"stop": stop, "max_new_tokens": max_tokens}
    for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(r, k) is not None:
            s[k] = float(getattr(r, k)) if k != "top_k" else int(r.top_k)
    if s.get("top_p") == 0.0:               # OpenAI allows top_p=0: only the best token survives
        s.update(temperature=0.0, top_p=1.0)
    s["seed"] = None if r.seed is None else r.seed % 2**64   # numpy seeds are non-negative; None = fresh
    return s


async def parse_body(request, cls):
    """Request body -> a validated `cls`, or 400 in OpenAI's shape."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the JSON body must be an object, got {type(data).__name__}", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages.{i}.content: only text parts are supported, got "
                                        f"{part.get('type')!r}", param=f"messages.{i}.content", code="invalid_value")
                texts.append(part["text"])
            content = "\n".join(texts)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content or ""})
    return out


def check_context(llm, prompt_ids: list[int], param: str):
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
    if len(prompt_ids) >= llm.n_ctx:
        raise APIError(400, f"This model's maximum context length is {llm.n_ctx} tokens, but the prompt has "
                            f"{len(prompt_ids)} tokens (at least one must be left for the answer).",
                       param=param, code="context_length_exceeded")
