from __future__ import annotations

import datetime
import decimal
import re
import uuid
from typing import Any

import pytest

from celery_idempotency import (
    ArgumentsNotCanonical,
    ConfigurationError,
    InvalidIdempotencyKey,
    RecordRef,
)
from celery_idempotency.keys import (
    MAX_ARGUMENT_DEPTH,
    MAX_KEY_LENGTH,
    bind_arguments,
    canonical_json,
    derive_key,
    fingerprint,
    validate_key,
)


def charge(order_id: int, amount: int = 100, *, currency: str = "EUR") -> None: ...


def variadic(first: int, *rest: int, **extra: Any) -> None: ...


def key_of(func: Any, *args: Any, fields: Any = None, key_func: Any = None,
           **kwargs: Any) -> str:
    arguments = bind_arguments(func, args, kwargs)
    return derive_key(arguments, fields=fields, func=key_func, args=args, kwargs=kwargs)


def test_positional_keyword_and_defaults_give_the_same_key_and_fingerprint() -> None:
    calls = [((42,), {}), ((42, 100), {}), ((), {"order_id": 42}),
             ((42,), {"amount": 100, "currency": "EUR"}), ((), {"amount": 100, "order_id": 42})]
    keys = {key_of(charge, *args, **kwargs) for args, kwargs in calls}
    fingerprints = {fingerprint(bind_arguments(charge, args, kwargs)) for args, kwargs in calls}
    assert len(keys) == 1 and len(fingerprints) == 1


def test_fingerprints_are_64_bits_and_keys_from_all_arguments_128() -> None:
    arguments = bind_arguments(charge, (42,), {})
    fp = fingerprint(arguments)
    key = key_of(charge, 42)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    # The derived key is an identity: the whole 128-bit digest, of which the fingerprint is
    # the first half.
    assert re.fullmatch(r"args:[0-9a-f]{32}", key) and key[len("args:"):].startswith(fp)


def test_different_arguments_give_different_keys() -> None:
    assert key_of(charge, 42) != key_of(charge, 43)
    assert key_of(charge, 42) != key_of(charge, 42, currency="USD")


def test_tuples_and_lists_are_the_same_after_a_json_round_trip() -> None:
    assert key_of(variadic, 1, (2, 3)) == key_of(variadic, 1, [2, 3])


def test_variadic_arguments_are_bound() -> None:
    assert key_of(variadic, 1, 2, 3, x=1) == key_of(variadic, 1, 2, 3, x=1)
    assert key_of(variadic, 1, 2, 3, x=1) != key_of(variadic, 1, 2, 3, x=2)
    assert key_of(variadic, 1, 2) != key_of(variadic, 1, 2, 3)


def test_key_fields_select_a_subset() -> None:
    a = key_of(charge, 42, 100, fields=("order_id",))
    b = key_of(charge, 42, 999, fields=("order_id",))
    c = key_of(charge, 43, 100, fields=("order_id",))
    assert a == b != c
    assert a.startswith("fields:")


def test_key_fields_naming_an_unknown_parameter_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="order"):
        key_of(charge, 42, fields=("order",))


def test_key_func_receives_args_and_kwargs_and_its_key_is_validated() -> None:
    seen: list[Any] = []

    def func(args: Any, kwargs: Any) -> str:
        seen.append((args, kwargs))
        return f"order-{kwargs.get('order_id', args[0] if args else None)}"

    assert key_of(charge, 42, key_func=func) == "order-42"
    assert seen == [((42,), {})]
    with pytest.raises(InvalidIdempotencyKey, match="idempotency_key_func"):
        key_of(charge, 42, key_func=lambda args, kwargs: "")


def test_arguments_that_do_not_fit_the_signature_raise() -> None:
    with pytest.raises(ArgumentsNotCanonical, match="signature"):
        bind_arguments(charge, (1, 2, 3), {})


@pytest.mark.parametrize("value", [object(), {1: "int key"}, float("nan"), bytearray(b"x"),
                                   {"set": {1, 2}}])
def test_non_json_arguments_raise_a_clear_error(value: Any) -> None:
    with pytest.raises(ArgumentsNotCanonical, match="argument"):
        canonical_json({"order_id": value})


def test_object_argument_error_names_the_argument_and_the_way_out() -> None:
    with pytest.raises(ArgumentsNotCanonical) as info:
        fingerprint(bind_arguments(charge, (object(),), {}))
    assert "order_id" in str(info.value) and "idempotency_key" in str(info.value)


def test_bytes_have_a_canonical_form_apart_from_strings() -> None:
    # Celery passes bytes (e.g. to link callbacks); kombu's JSON round-trips them.
    assert canonical_json([b"ab\xff"]) == '[{"$bytes":"YWL/"}]'
    assert canonical_json([b"ab"]) != canonical_json(["ab"])


def test_common_scalar_types_have_tagged_canonical_forms() -> None:
    day = datetime.date(2026, 1, 2)
    assert canonical_json([day]) != canonical_json(["2026-01-02"])
    assert canonical_json([datetime.datetime(2026, 1, 2, 3, 4)]) == \
        '[{"$datetime":"2026-01-02T03:04:00"}]'
    assert canonical_json([uuid.UUID(int=1)]) == \
        '[{"$uuid":"00000000-0000-0000-0000-000000000001"}]'
    assert canonical_json([decimal.Decimal("1.10")]) == '[{"$decimal":"1.10"}]'


def test_canonical_json_is_independent_of_dict_order() -> None:
    assert canonical_json({"a": 1, "b": {"y": 2, "x": 1}}) == \
        canonical_json({"b": {"x": 1, "y": 2}, "a": 1})


@pytest.mark.parametrize(("key", "reason"), [
    ("", "empty"),
    ("x" * (MAX_KEY_LENGTH + 1), "256 characters"),
    ("a\nb", "U+000A"),
    ("a\x00b", "U+0000"),
    ("a\x7fb", "U+007F"),
    (42, "not int"),
    (None, "not NoneType"),
])
def test_invalid_keys_are_refused_with_the_reason(key: Any, reason: str) -> None:
    with pytest.raises(InvalidIdempotencyKey, match=re.escape(reason)):
        validate_key(key)


def test_valid_keys_are_accepted_unchanged() -> None:
    for key in ("a", "x" * MAX_KEY_LENGTH, "8e0f6b52-5d4c-4b7a-9a51-5bd0e6f6a0c2",
                "order 42 / ünïcode ✓", "*?[]{}"):
        assert validate_key(key) == key


def test_store_keys_are_bounded_cluster_safe_and_free_of_the_user_key() -> None:
    long_key = "k" * MAX_KEY_LENGTH
    name = RecordRef("tasks.charge", long_key).store_key("idem:")
    # 21 base64url characters (126 bits): 28 bytes with the default prefix, which Redis
    # allocates in jemalloc's 32-byte class.
    assert len(name) == len("idem:") + 23 == 28
    assert re.fullmatch(r"idem:\{[A-Za-z0-9_-]{21}\}", name)
    assert name.count("{") == 1 and name.endswith("}")
    assert long_key not in name
    assert RecordRef("*", "?").store_key("p:").startswith("p:{")
    assert RecordRef("a", "b").store_key("p:") != RecordRef("b", "a").store_key("p:")
    # The separator keeps ("a:b", "c") and ("a", "b:c") apart.
    assert RecordRef("a:b", "c").store_key("p:") != RecordRef("a", "b:c").store_key("p:")


# -- recursive and deep arguments ---------------------------------------------------------------

def nested(depth: int) -> list[Any]:
    top: list[Any] = []
    cursor = top
    for _ in range(depth - 1):
        cursor.append([])
        cursor = cursor[0]
    return top


@pytest.mark.parametrize("make", [
    lambda: (loop := []).append(loop) or loop,  # type: ignore[func-returns-value]
    lambda: (loop := {}).update(me=loop) or loop,  # type: ignore[func-returns-value]
    lambda: (loop := {"a": [1]})["a"].append(loop) or loop,  # type: ignore[func-returns-value]
], ids=["list", "dict", "dict-in-list"])
def test_recursive_arguments_raise_arguments_not_canonical(make: Any) -> None:
    with pytest.raises(ArgumentsNotCanonical, match="contains itself") as raised:
        fingerprint({"order": make()})
    assert "arguments['order']" in str(raised.value)


def test_deep_arguments_raise_arguments_not_canonical_not_recursion_error() -> None:
    for depth in (MAX_ARGUMENT_DEPTH + 1, 10_000, 200_000):
        with pytest.raises(ArgumentsNotCanonical, match=f"more than {MAX_ARGUMENT_DEPTH} levels"):
            fingerprint({"payload": nested(depth)})
    with pytest.raises(ArgumentsNotCanonical, match="levels deep"):
        key_of(charge, 1, fields=("order_id", "amount"), amount=nested(1000))


def test_nesting_up_to_the_limit_and_shared_references_are_accepted() -> None:
    assert fingerprint({"payload": nested(MAX_ARGUMENT_DEPTH)})
    shared = {"sku": "A1"}
    # The same object twice is not a cycle.
    assert canonical_json([shared, shared, [shared]]) == \
        '[{"sku":"A1"},{"sku":"A1"},[{"sku":"A1"}]]'


def test_a_task_published_with_recursive_arguments_gets_arguments_not_canonical() -> None:
    from celery_idempotency import IdempotentTask
    from tests.support.apps import eager_app

    app = eager_app("deep")

    @app.task(shared=False, base=IdempotentTask)
    def store_document(document: Any) -> None: ...

    loop: list[Any] = []
    loop.append(loop)
    for bad in (loop, nested(5000)):
        with pytest.raises(ArgumentsNotCanonical):
            store_document.delay(bad)
