"""A served teacher in a recipe: the `served:` section (`ServedConfig`) and the `ServedTeacher`
it describes (`served_teacher`), fetching the answers first when it names an endpoint."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import Field as PydField
from pydantic import ValidationError, model_validator

from distill.engine.config import Strict
from distill.errors import ConfigError
from distill.nlp.served import ServedTeacher, fetch_responses


class ServedConfig(Strict):
    """A served teacher in a recipe: `teacher: {served: {file: responses.jsonl}}`, or with an
    endpoint to fetch the file from once: `{file: ..., endpoint: URL, model: NAME, top_logprobs: 20}`."""

    file: str = PydField(description="the responses file (JSON Lines); fetched into when endpoint is set")
    endpoint: str | None = PydField(None, description="an OpenAI-compatible server (http://host:8000/v1)")
    model: str | None = PydField(None, description="the model name the endpoint serves")
    top_logprobs: int = PydField(
        20, ge=1, le=20, description="alternatives asked per token (the API allows 20)"
    )
    k: int | None = PydField(None, ge=1, description="alternatives used per token (default: top_logprobs)")
    prompt_template: str = PydField(
        "", description="the student's text before each answer ({prompt} replaced)"
    )
    max_tokens: int = PydField(128, ge=1)
    temperature: float = PydField(
        1.0, ge=0, description="sampling temperature of the answers (logprobs: see docs)"
    )
    mode: Literal["exact", "prefix"] = "exact"

    @model_validator(mode="after")
    def _consistent(self):
        if self.endpoint and not self.model:
            raise ValueError("endpoint needs model: (the name the server serves)")
        if self.k is not None and self.k > self.top_logprobs:
            raise ValueError(f"k ({self.k}) is more than the top_logprobs ({self.top_logprobs}) asked for")
        return self


def served_config(spec: Mapping | ServedConfig, where: str = "teacher.served") -> ServedConfig:
    """The section validated, errors named by key (`teacher.served.k: ...`)."""
    from distill.run.config import format_validation_error

    if isinstance(spec, ServedConfig):
        return spec
    try:
        return ServedConfig.model_validate(dict(spec))
    except ValidationError as e:
        msg = format_validation_error(e, ServedConfig)
        unknown = "unknown key '"
        msg = unknown + f"{where}." + msg[len(unknown) :] if msg.startswith(unknown) else f"{where}.{msg}"
        raise ConfigError(msg) from None


def served_teacher(
    spec: Mapping | ServedConfig,
    student_tokenizer,
    prompts: Iterable | None = None,
    where: str = "teacher.served",
    name: str = "teacher",
) -> ServedTeacher:
    """The `ServedTeacher` a recipe's `served:` section describes; with an endpoint, its answers
    are fetched first (once: a file already holding them is only completed).

    Args:
        prompts: what to ask the endpoint (user messages or message lists); needed with `endpoint`.
        where: the section's key path, for errors (`teacher.served.k: ...`).
    """
    spec = served_config(spec, where)
    if spec.endpoint:
        if prompts is None:
            raise ConfigError(
                f"{where}.endpoint: give the prompts to ask it (a prompts file or the data's prompts)"
            )
        fetch_responses(
            spec.file,
            spec.endpoint,
            spec.model or "",
            prompts,
            top_logprobs=spec.top_logprobs,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
        )
    return ServedTeacher(
        spec.file,
        student_tokenizer,
        k=spec.k or spec.top_logprobs,
        prompt_template=spec.prompt_template,
        name=name,
        mode=spec.mode,
    )
