"""Generation requests: validation of a completion or chat body into a ``GenRequest``.

Validation follows vLLM 0.32's serving layer: an unknown model is a 404, a missing ``model`` is
accepted, ``max_tokens`` is clamped to the context left after the prompt but refused when it is
larger than the whole context, and a prompt longer than ``max_model_len`` is a 400
(``pdsim.errors`` has the error shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from pdsim.errors import (
    ApiError,
    field_error,
    model_not_found,
    not_an_object,
    schema_error,
    vllm_error,
)
from pdsim.model import SamplingSpec
from pdsim.tokenizer import SimTokenizer

Kind = Literal["completion", "chat"]
GREEDY_TEMPERATURE = 1e-5  # vLLM samples greedily below this (_SAMPLING_EPS)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its ids, its text as echoed, its sampling (``max_tokens``
    clamped to the context it leaves)."""

    ids: list[int]
    text: str
    spec: SamplingSpec


@dataclass(frozen=True)
class GenRequest:
    """A validated generation request: ``n`` completions of each prompt (choice i * n + j)."""

    kind: Kind
    prompts: list[Prompt]
    stream: bool
    include_usage: bool
    kv_params: dict[str, Any] | None
    return_token_ids: bool = False  # token ids in full responses and in stream chunks
    n: int = 1
    seed: int | None = None  # sampling seed; None: greedy (see model.Generation)
    beam: bool = False  # use_beam_search: n beams
    echo: str | None = None  # text put before each choice's output (chat: the last message)
    echo_only: bool = False  # completions echo with max_tokens 0: the prompt alone
    logprobs: int | None = None  # logprobs per output token (chat: top_logprobs)
    prompt_logprobs: int | None = None
    priority: int = 0
    continuous_usage: bool = False

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0].ids

    def spec(self, i: int, j: int) -> SamplingSpec:
        """Sampling of completion j of prompt i: vLLM gives sample j the seed ``seed + j``."""
        spec = self.prompts[i].spec
        if self.beam:
            return replace(spec, first_rank=j)
        if self.seed is not None:
            return replace(spec, seed=self.seed + j)
        return spec


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        msg = "Input should be a valid integer, unable to parse string as an integer"
        raise schema_error([field_error("int_parsing", name, msg, value)])
    if isinstance(value, float) and not value.is_integer():
        msg = "Input should be a valid integer, got a number with a fractional part"
        raise schema_error([field_error("int_from_float", name, msg, value)])
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise schema_error(
            [field_error("int_type", name, "Input should be a valid integer", value)]
        )
    return int(value)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    )


def _raw_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """A completions body's prompts, each a string or token ids, as vLLM's schema reads them."""
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        raise vllm_error("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt == []:
        raise vllm_error("You must pass at least one prompt", None)
    if _token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt) or all(_token_ids(p) for p in prompt):
            if any(p in ("", []) for p in prompt):
                raise vllm_error("The decoder prompt cannot be empty", None)
            return list(prompt)
        if isinstance(prompt[0], str):
            msg = "Input should be a valid integer, unable to parse string as an integer"
            raise schema_error([field_error("int_parsing", "prompt.0", msg, prompt[0])])
        if isinstance(prompt[0], list):
            msg = "Input should be a valid integer"
            raise schema_error([field_error("int_type", "prompt.0", msg, prompt[0])])
    msg = "Input should be a valid string"
    raise schema_error([field_error("string_type", "prompt", msg, prompt)])


def _prompts(
    kind: Kind, body: dict[str, Any], tok: SimTokenizer
) -> list[tuple[list[int], bool, str]]:
    """Each prompt's token ids, whether they came from text (vLLM then counts an overlong
    prompt only up to ``max_model_len + 1``), and its text."""
    if kind == "chat":
        if "messages" not in body:
            raise schema_error([field_error("missing", "messages", "Field required", body)])
        messages = body["messages"]
        if not isinstance(messages, list):
            msg = "Input should be a valid list"
            raise schema_error([field_error("list_type", "messages", msg, messages)])
        if not messages:
            raise vllm_error(
                "Cannot apply chat template to an empty conversation. "
                "Provide at least one message.",
                None,
            )
        try:
            text = tok.apply_chat_template(messages, bool(body.get("add_generation_prompt", True)))
        except ValueError as e:
            raise ApiError(str(e), param="messages") from e
        return [(tok.encode(text), True, text)]
    special = bool(body.get("add_special_tokens", True))
    return [
        (tok.encode(p, special), True, p) if isinstance(p, str) else (list(p), False, tok.decode(p))
        for p in _raw_prompts(body)
    ]


def _chat_echo(body: dict[str, Any]) -> str:
    """What vLLM's chat `echo` puts before the output: the last message's content when its role
    is the response's (the assistant's, or with add_generation_prompt false any)."""
    last = body["messages"][-1]
    role = "assistant" if body.get("add_generation_prompt", True) else last.get("role")
    content = last.get("content") if last.get("role") == role else None
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _sampling(body: dict[str, Any], n: int, beam: bool) -> int | None:
    """The seed to sample with, or None for greedy; rejects what vLLM's SamplingParams does."""
    if n < 1:
        raise vllm_error(f"n must be at least 1, got {n}.", None)
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float))
    ):
        msg = "Input should be a valid number"
        raise schema_error([field_error("float_type", "temperature", msg, temperature)])
    greedy = temperature is not None and temperature < GREEDY_TEMPERATURE
    if greedy and n > 1 and not beam:
        raise vllm_error(f"n must be 1 when using greedy sampling, got {n}.", None)
    seed = _int_field(body, "seed")
    return None if greedy or beam or seed is None or seed == -1 else seed


def _logprob_counts(kind: Kind, body: dict[str, Any]) -> tuple[int | None, int | None]:
    """Logprobs per output token and per prompt token, as vLLM reads and checks them (a stream
    may not ask `prompt_logprobs`, but may echo with `logprobs`, which implies them)."""
    prompt_k = _int_field(body, "prompt_logprobs")
    if body.get("stream") and prompt_k is not None and (prompt_k > 0 or prompt_k == -1):
        raise vllm_error(
            "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
        )
    if kind == "chat":
        top = _int_field(body, "top_logprobs") or 0
        out_k = top if body.get("logprobs") else None
    else:
        out_k = _int_field(body, "logprobs")
        if prompt_k is None and body.get("echo"):
            prompt_k = out_k
    for name, k in (("prompt_logprobs", prompt_k), ("logprobs", out_k)):
        if k is not None and k < 0 and k != -1:
            raise vllm_error(f"`{name}` must be a positive value or -1.", name, k)
    return out_k, prompt_k


def _context_error(max_model_len: int, count: int) -> ApiError:
    qualifier = "at least " if count == max_model_len + 1 else ""
    return vllm_error(
        f"This model's maximum context length is {max_model_len} tokens. However, your "
        f"prompt contains {qualifier}{count} input tokens, which exceeds this limit even "
        f"without any output tokens. Please reduce the length of the input prompt.",
        "input_tokens",
        count,
    )


def _output_cap_name(kind: Kind, body: dict[str, Any]) -> str:
    """The field that caps the output: chat's ``max_completion_tokens`` when given."""
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        return "max_completion_tokens"
    return "max_tokens"


def _check_output_cap(kind: Kind, body: dict[str, Any], max_model_len: int) -> None:
    """vLLM refuses an output cap larger than the whole context before it reads the prompt
    (its tokenize parameters are built first); a cap that only overruns the room the prompt
    leaves is clamped to that room later (``_specs``)."""
    name = _output_cap_name(kind, body)
    cap = _int_field(body, name)
    if cap is not None and cap > max_model_len:
        raise vllm_error(
            f"{name}={cap} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            name,
            cap,
        )


def _max_tokens(kind: Kind, body: dict[str, Any], echo: bool) -> tuple[int | None, bool]:
    """The requested output cap (None: up to the context) and whether this is a completions
    echo of the prompt alone (``max_tokens: 0``, which vLLM serves by generating one token)."""
    if kind == "chat":
        max_tokens = _int_field(body, _output_cap_name(kind, body))
    else:
        max_tokens = _int_field(body, "max_tokens")
        if max_tokens is None:
            max_tokens = 16
    echo_only = kind == "completion" and echo and max_tokens == 0
    if echo_only:
        max_tokens = 1
    if max_tokens is not None and max_tokens < 1:
        # vLLM names max_tokens even when the chat client sent max_completion_tokens
        raise vllm_error(
            f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens
        )
    return max_tokens, echo_only


def _stops(body: dict[str, Any]) -> tuple[tuple[str, ...], frozenset[int]]:
    """Stop strings (empty ones dropped) and stop token ids."""
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise schema_error(
            [
                field_error("string_type", "stop", "Input should be a valid string", stop),
                field_error("list_type", "stop", "Input should be a valid list", stop),
            ]
        )
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        msg = "Input should be a valid list of integers"
        raise schema_error([field_error("list_type", "stop_token_ids", msg, stop_ids)])
    return stops, frozenset(stop_ids)


def _kv_params(body: dict[str, Any]) -> dict[str, Any] | None:
    kv = body.get("kv_transfer_params")
    if kv is not None and not isinstance(kv, dict):
        msg = "Input should be a valid dictionary"
        raise schema_error([field_error("dict_type", "kv_transfer_params", msg, kv)])
    return kv


def _specs(
    body: dict[str, Any],
    prompts: list[tuple[list[int], bool, str]],
    max_tokens: int | None,
    max_model_len: int,
) -> tuple[list[Prompt], dict[str, Any] | None]:
    """Each prompt with its sampling (``max_tokens`` clamped to the context it leaves), and the
    request's ``kv_transfer_params``, checked in vLLM's order."""
    min_key = "min_completion_tokens" if "min_completion_tokens" in body else "min_tokens"
    min_tokens = _int_field(body, min_key) or 0
    stops, stop_ids = _stops(body)
    kv = _kv_params(body)
    parsed = []
    for ids, _, text in prompts:
        room = max_model_len - len(ids)
        limit = room if max_tokens is None else min(max_tokens, room)
        if limit < 1:
            raise ApiError(
                f"This model's maximum context length is {max_model_len} tokens and the prompt "
                f"uses all of them, leaving no room for output.",
                param="max_tokens",
            )
        if min_tokens < 0 or min_tokens > limit:
            raise ApiError(f"{min_key} must be between 0 and max_tokens.", param=min_key)
        spec = SamplingSpec(
            max_tokens=limit,
            min_tokens=min_tokens,
            ignore_eos=bool(body.get("ignore_eos", False)),
            stop=stops,
            stop_token_ids=stop_ids,
            include_stop_str_in_output=bool(body.get("include_stop_str_in_output", False)),
        )
        parsed.append(Prompt(ids, text, spec))
    return parsed, kv


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats)."""
    stream = bool(body.get("stream", False))
    stream_options = body.get("stream_options")
    if stream_options and not stream:
        raise vllm_error("Stream options can only be defined when `stream=True`.", "stream_options")
    options = stream_options if isinstance(stream_options, dict) else {}
    include_usage = bool(options.get("include_usage"))
    return stream, include_usage, include_usage and bool(options.get("continuous_usage_stats"))


def _echo_text(kind: Kind, body: dict[str, Any]) -> str | None:
    if not body.get("echo"):
        return None
    if kind == "chat":
        return _chat_echo(body)
    return ""  # per prompt: Prompt.text (empty with return_token_ids, as vLLM)


def parse_generation(
    kind: Kind, body: Any, model: str, max_model_len: int, tok: SimTokenizer
) -> GenRequest:
    """Validate a completion or chat body; raises ``ApiError``."""
    if not isinstance(body, dict):
        raise not_an_object(body)
    requested = body.get("model")
    if requested is not None and requested != model:
        raise model_not_found(requested, model)
    n_field = _int_field(body, "n")
    n = 1 if n_field is None else n_field
    priority = _int_field(body, "priority") or 0
    stream, include_usage, continuous_usage = _stream_options(body)
    out_k, prompt_k = _logprob_counts(kind, body)
    _check_output_cap(kind, body, max_model_len)
    prompts = _prompts(kind, body, tok)
    for ids, from_text, _ in prompts:
        if len(ids) > max_model_len:
            raise _context_error(max_model_len, max_model_len + 1 if from_text else len(ids))
    max_tokens, echo_only = _max_tokens(kind, body, bool(body.get("echo")))
    beam = bool(body.get("use_beam_search"))
    seed = _sampling(body, n, beam)
    parsed, kv = _specs(body, prompts, max_tokens, max_model_len)
    return GenRequest(
        kind,
        parsed,
        stream,
        include_usage,
        kv,
        bool(body.get("return_token_ids")),
        n=n,
        seed=seed,
        beam=beam,
        echo=_echo_text(kind, body),
        echo_only=echo_only,
        logprobs=out_k,
        prompt_logprobs=prompt_k,
        priority=priority,
        continuous_usage=continuous_usage,
    )
