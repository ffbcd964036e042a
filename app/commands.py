"""The `/verify` command in a PR comment.

    /verify [MODEL_TYPE ...] [--hub REPO_ID ...] [--checks a,b] [--dtype bfloat16]
    /verify help

The command must stand on its own line; the first such line of a comment counts.
Everything in it is untrusted text, so each part is checked against a narrow pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
MAX_MODEL_TYPES = 16
MAX_HUB_REPOS = 4

MODEL_TYPE = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}")
CHECK_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
COMMAND_LINE = re.compile(r"^/verify(?:[ \t]+(.*))?$")

USAGE = ("/verify [MODEL_TYPE ...] [--hub REPO_ID ...] [--checks a,b] "
         "[--dtype float32|bfloat16|float16]")


class CommandError(Exception):
    """A malformed command: the message is templated text safe to quote back."""


@dataclass(frozen=True)
class VerifyRequest:
    """What to run. Empty model_types: plan them from the PR's changed files."""

    model_types: tuple[str, ...] = ()
    hub: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    dtype: str = "float32"
    source: str = "auto"  # "auto" (a PR event) or "command" (/verify)

    def to_dict(self) -> dict:
        return {"model_types": list(self.model_types), "hub": list(self.hub),
                "checks": list(self.checks), "dtype": self.dtype, "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> VerifyRequest:
        return cls(model_types=tuple(data.get("model_types", ())), hub=tuple(data.get("hub", ())),
                   checks=tuple(data.get("checks", ())), dtype=data.get("dtype", "float32"),
                   source=data.get("source", "auto"))

    def key(self) -> str:
        """Stable text naming the request: part of the job id."""
        return "|".join([",".join(self.model_types), ",".join(self.hub),
                         ",".join(self.checks), self.dtype, self.source])


@dataclass(frozen=True)
class Command:
    help: bool = False
    request: VerifyRequest = field(default_factory=VerifyRequest)


def find_command_line(body: str | None) -> str | None:
    """The first line that is a /verify command, or None."""
    for line in (body or "").splitlines():
        line = line.strip()
        if COMMAND_LINE.match(line):
            return line
    return None


def parse(line: str) -> Command:
    """Parse one command line; CommandError with a short reason when malformed."""
    match = COMMAND_LINE.match(line.strip())
    if match is None:
        raise CommandError("not a /verify command")
    words = (match.group(1) or "").split()
    if words == ["help"]:
        return Command(help=True)
    model_types: list[str] = []
    hub: list[str] = []
    checks: list[str] = []
    dtype = "float32"
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("--hub", "--checks", "--dtype"):
            if i + 1 >= len(words):
                raise CommandError(f"{word} needs a value")
            value = words[i + 1]
            i += 2
            if word == "--hub":
                if not HUB_REPO.fullmatch(value):
                    raise CommandError("--hub takes a Hugging Face repo id like owner/name")
                hub.append(value)
            elif word == "--checks":
                names = [c for c in value.split(",") if c]
                if not names or not all(CHECK_NAME.fullmatch(c) for c in names):
                    raise CommandError("--checks takes comma-separated check names")
                checks.extend(names)
            else:
                if value not in DTYPES:
                    raise CommandError(f"--dtype takes one of {', '.join(DTYPES)}")
                dtype = value
            continue
        if word.startswith("-"):
            raise CommandError("unknown option")
        if not MODEL_TYPE.fullmatch(word):
            raise CommandError("a model_type is lower-case letters, digits, '_', '-' or '.'")
        model_types.append(word)
        i += 1
    if len(model_types) > MAX_MODEL_TYPES:
        raise CommandError(f"at most {MAX_MODEL_TYPES} model_types per command")
    if len(hub) > MAX_HUB_REPOS:
        raise CommandError(f"at most {MAX_HUB_REPOS} --hub repos per command")
    request = VerifyRequest(
        model_types=tuple(dict.fromkeys(model_types)), hub=tuple(dict.fromkeys(hub)),
        checks=tuple(dict.fromkeys(checks)), dtype=dtype, source="command")
    return Command(request=request)
