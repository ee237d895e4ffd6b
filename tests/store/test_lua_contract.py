"""The Lua scripts against their one Python definition: each script names, at its top, the
ARGV that `SCRIPT_ARGS` (store/redis.py) passes, in the same order, and writes no record field
that records.py does not define. No Redis needed: the scripts are read as text."""

from __future__ import annotations

import importlib.resources
import re

import pytest

from celery_idempotency.records import ALL_FIELDS, STATE_CODES, KeyState
from celery_idempotency.store.redis import _SCRIPTS, SCRIPT_ARGS

LUA = importlib.resources.files("celery_idempotency.store").joinpath("lua")
# Quoted words in the scripts that are not field names: commands, stored states, replies.
NOT_FIELDS = {"TIME", "HGETALL", "HGET", "HMGET", "HSET", "HDEL", "DEL", "EXISTS", "PTTL",
              "PEXPIRE", "%.0f", *STATE_CODES.values(), "succeeded", "failed", "claimed",
              "taken_over", "busy", "parked", "handled", "mismatch", "ok", "lost", "reserved",
              "duplicate", "stale", "", "0", "1"}


def _code(name: str) -> str:
    """The script without its comments."""
    text = LUA.joinpath(f"{name}.lua").read_text()
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def _argv_names(code: str) -> tuple[list[str], str]:
    """The names of ``local a, b = ARGV[1], tonumber(ARGV[2])`` lines, in ARGV order, and the
    code below the last of them."""
    names: dict[int, str] = {}
    lines = code.splitlines()
    last = 0
    for number, line in enumerate(lines):
        match = re.match(r"local ([\w, ]+) = (.*ARGV\[.*)$", line)
        if match:
            variables = [v.strip() for v in match.group(1).split(",")]
            indices = [int(i) for i in re.findall(r"ARGV\[(\d+)\]", match.group(2))]
            names.update(zip(indices, variables, strict=True))
            last = number
    return [names[index] for index in sorted(names)], "\n".join(lines[last + 1:])


@pytest.mark.parametrize("script", sorted(SCRIPT_ARGS))
def test_each_script_names_its_argv_once_at_the_top_in_the_python_order(script: str) -> None:
    code = _code(script)
    wanted = [{"error": "error_json"}.get(name, name) for name in SCRIPT_ARGS[script]]
    names, body = _argv_names(code)
    assert names == wanted
    header = LUA.joinpath(f"{script}.lua").read_text().split("\nlocal ", 1)[0]
    assert "-- KEYS:" in header and "-- ARGV:" in header and "-- Returns" in header
    # Named once: no positional ARGV below the names.
    assert "ARGV[" not in body, f"{script}.lua uses ARGV positionally below its names"


@pytest.mark.parametrize("script", sorted(_SCRIPTS))
def test_scripts_write_only_fields_that_records_defines(script: str) -> None:
    quoted = set(re.findall(r"'([^']*)'", _code(script)))
    assert quoted - NOT_FIELDS <= set(ALL_FIELDS), quoted - NOT_FIELDS - set(ALL_FIELDS)


def test_the_scripts_name_the_stored_states_as_records_defines_them() -> None:
    """_common.lua spells each state's letter once; no script writes or compares a state
    otherwise (a public name such as 'pending' would never match a record)."""
    match = re.search(r"^local PENDING, STARTED, SUCCEEDED, FAILED = (.*)$", _code("_common"),
                      re.MULTILINE)
    assert match, "_common.lua names the states"
    letters = re.findall(r"'([^']*)'", match.group(1))
    assert letters == [STATE_CODES[state] for state in (
        KeyState.PENDING, KeyState.STARTED, KeyState.SUCCEEDED, KeyState.FAILED)]
    assert not set(letters) & set(ALL_FIELDS), "a state letter reads like a field name"
    for script in SCRIPT_ARGS:
        code = _code(script)
        assert not re.search(r"'pending'|'started'", code), f"{script}.lua: a public state name"
        assert not set(re.findall(r"'([A-Z])'", code)) & set(letters), \
            f"{script}.lua spells a state letter instead of its name"


def test_every_shared_function_is_used_by_some_script() -> None:
    common = _code("_common")
    functions = re.findall(r"^local function (\w+)", common, re.MULTILINE)
    bodies = dict(zip(functions, re.split(r"^local function \w+", common, flags=re.MULTILINE)[1:],
                      strict=True))
    used = {function for function in functions
            if any(re.search(rf"\b{function}\(", _code(name)) for name in _SCRIPTS)}
    # A helper of the helpers counts once a used helper calls it.
    while extra := {function for function in set(functions) - used
                    if any(re.search(rf"\b{function}\(", bodies[user]) for user in used)}:
        used |= extra
    assert set(functions) == used, f"_common.lua: {set(functions) - used} used by no script"
