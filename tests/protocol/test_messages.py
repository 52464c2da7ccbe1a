"""Tests for envfarm.protocol.messages (check/make) and envfarm.protocol.errors (ErrorInfo)."""

from __future__ import annotations

import gymnasium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envfarm.protocol import PROTOCOL_VERSION, ErrorInfo, ProtocolError, pack, unpack
from envfarm.protocol import messages as m

FAST = settings(max_examples=150, deadline=None)

GOOD_VALUE = {
    int: 7,
    str: "x",
    list: [1, "a"],
    tuple: (1, "a"),
    dict: {"k": 1},
    bool: True,
    bytes: b"id",
    type(None): None,
}
# Values of every wire type, to find one that a field must refuse.
CANDIDATES = [1.5, "text", 3, [1], {"k": 1}, None, b"raw", True]


def as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def well_formed(kind: str, rid: int = 1) -> dict:
    fields = {name: GOOD_VALUE[as_tuple(types)[0]] for name, types in m.FIELDS[kind].items()}
    if kind == m.HELLO:
        fields["version"] = PROTOCOL_VERSION
    return m.make(kind, rid, **fields)


ALL_FIELDS = [(kind, name) for kind, fields in m.FIELDS.items() for name in fields]
WRONG_VALUES = [
    (kind, name, value)
    for kind, name in ALL_FIELDS
    for value in CANDIDATES
    if not isinstance(value, as_tuple(m.FIELDS[kind][name])) and not isinstance(value, bool)
]  # bools in int fields: see test_bool_is_not_an_int_field
REQUIRED_FIELDS = [(kind, name) for kind, name in ALL_FIELDS if not isinstance(None, m.FIELDS[kind][name])]


# --------------------------------------------------------------------------- check


def test_every_kind_constant_has_a_field_table():
    kinds = [
        m.HELLO,
        m.CREATE,
        m.CREATED,
        m.ATTACH,
        m.ATTACHED,
        m.RESET,
        m.STEP,
        m.CALL,
        m.SET_ATTR,
        m.CLOSE,
        m.RESULT,
        m.ERROR,
        m.LEASE,
        m.LEASED,
        m.JOIN,
        m.RELEASE,
        m.STATUS,
    ]
    assert set(kinds) <= set(m.FIELDS)
    constants = {v for k, v in vars(m).items() if k.isupper() and isinstance(v, str)}
    assert set(m.FIELDS) <= constants  # every kind in the table is a named constant


@pytest.mark.parametrize("kind", sorted(m.FIELDS))
def test_well_formed_message_of_each_kind_passes(kind):
    message = well_formed(kind, rid=42)
    assert m.check(message) is message
    assert message["kind"] == kind and message["rid"] == 42
    # and it still passes after crossing the wire
    received = unpack(pack(message))
    assert m.check(received) == message


def test_make_builds_the_map():
    assert m.make(m.STEP, 3, actions=[1, 2]) == {"kind": "step", "rid": 3, "actions": [1, 2]}
    assert m.make(m.CLOSE, 0) == {"kind": "close", "rid": 0}


def test_extra_fields_are_allowed():
    message = well_formed(m.RESULT)
    message.update(obs=[1], infos={}, rewards=[0.0])
    assert m.check(message) is message


def test_realistic_messages_pass():
    for message in [
        m.make(m.HELLO, 0, version=PROTOCOL_VERSION, pid=1234, host="node-1"),
        m.make(m.CREATE, 1, envs=[0, 1], source={"id": "CartPole-v1"}, autoreset_mode="NextStep"),
        m.make(m.CREATED, 1, spaces=[{"type": "Discrete"}], metadata={}, render_mode=None),
        m.make(m.RESET, 3, envs=(0,), seeds=[None], options=None),
        m.make(m.RESULT, 4, errors=[[0, {"type": "ValueError", "message": "x"}]]),
        m.make(m.ERROR, 5, error=ErrorInfo("ValueError", "boom").to_data()),
    ]:
        assert m.check(message) is message


@pytest.mark.parametrize("kind", ["nope", "HELLO", "", None, 5, b"hello"])
def test_unknown_kind(kind):
    with pytest.raises(ProtocolError, match="unknown message kind") as info:
        m.check({"kind": kind, "rid": 1})
    assert repr(kind)[:20] in str(info.value)
    assert "hello" in str(info.value)  # lists the known kinds


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "kind",
    [["hello"], {"kind": "hello"}, nested(1000), "x" * 1_000_000, 2**5000],
    ids=["list", "dict", "deep", "long", "huge-int"],
)
def test_an_unknown_kind_is_described_safely_and_briefly(kind):
    # repr() of a list nested 1000 deep raises RecursionError; of a long str, costs its size
    with pytest.raises(ProtocolError, match="unknown message kind") as info:
        m.check({"kind": kind, "rid": 1})
    assert len(str(info.value)) < 300


def test_missing_kind():
    with pytest.raises(ProtocolError, match="unknown message kind None"):
        m.check({"rid": 1})


@pytest.mark.parametrize("kind", sorted(m.FIELDS))
@pytest.mark.parametrize("rid", ["missing", None, "1", 1.0, True, [1]])
def test_rid_must_be_an_int(kind, rid):
    message = well_formed(kind)
    if rid == "missing":
        del message["rid"]
    else:
        message["rid"] = rid
    with pytest.raises(ProtocolError, match=rf"{kind} message has no integer 'rid'"):
        m.check(message)


@pytest.mark.parametrize("kind, name, bad", WRONG_VALUES, ids=lambda v: repr(v)[:12] if not isinstance(v, str) else v)
def test_wrong_field_type_names_kind_and_field(kind, name, bad):
    message = well_formed(kind)
    message[name] = bad
    with pytest.raises(ProtocolError) as info:
        m.check(message)
    text = str(info.value)
    assert f"{kind} message field {name!r}" in text
    assert type(bad).__name__ in text


@pytest.mark.parametrize("kind, name", REQUIRED_FIELDS)
def test_missing_required_field_names_it(kind, name):
    message = well_formed(kind)
    del message[name]
    with pytest.raises(ProtocolError, match=rf"{kind} message field '{name}'.*got NoneType"):
        m.check(message)


@pytest.mark.parametrize("kind, name", [(k, n) for k, n in ALL_FIELDS if isinstance(None, m.FIELDS[k][n])])
def test_optional_fields_accept_none(kind, name):
    message = well_formed(kind)
    message[name] = None
    assert m.check(message) is message


@pytest.mark.parametrize("version", [0, 1, PROTOCOL_VERSION + 1, -1, 2**40])
def test_hello_with_another_protocol_version(version):
    message = m.make(m.HELLO, 0, version=version, pid=1, host="h")
    with pytest.raises(ProtocolError, match=rf"version {version}\b.*speaks {PROTOCOL_VERSION}"):
        m.check(message)


@pytest.mark.parametrize("version", ["1", 1.0, None])
def test_hello_version_must_be_an_int(version):
    with pytest.raises(ProtocolError, match="hello message field 'version'"):
        m.check(m.make(m.HELLO, 0, version=version, pid=1, host="h"))


@pytest.mark.parametrize("field", ["version", "pid"])
def test_bool_is_not_an_int_field(field):
    fields = {"version": PROTOCOL_VERSION, "pid": 1, "host": "h", field: True}
    with pytest.raises(ProtocolError, match=field):
        m.check(m.make(m.HELLO, 0, **fields))


# --------------------------------------------------------------------------- ErrorInfo


class OuterError(Exception):
    class Inner(RuntimeError):
        pass


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - capturing for the test
        return e


def test_from_exception_builtin():
    info = ErrorInfo.from_exception(raised(ValueError("boom")))
    assert info.type == "ValueError"
    assert info.message == "boom"
    assert info.traceback.startswith("Traceback (most recent call last)")
    assert "ValueError: boom" in info.traceback
    assert "raised" in info.traceback  # the frame that raised it


def test_from_exception_qualified_names():
    inner = ErrorInfo.from_exception(OuterError.Inner("deep"))
    assert inner.type == f"{OuterError.__module__}.OuterError.Inner"
    gym_error = ErrorInfo.from_exception(gymnasium.error.ResetNeeded("reset first"))
    assert gym_error.type == "gymnasium.error.ResetNeeded"
    assert gym_error.message == "reset first"


def test_from_exception_without_traceback():
    info = ErrorInfo.from_exception(KeyError("k"))
    assert info.type == "KeyError"
    assert info.message == "k"  # the key: a KeyError rebuilt from it says "'k'" as the original does
    assert "KeyError" in info.traceback


def test_from_exception_chained():
    try:
        try:
            raise OSError("inner cause")
        except OSError as e:
            raise RuntimeError("outer") from e
    except RuntimeError as e:
        info = ErrorInfo.from_exception(e)
    assert info.type == "RuntimeError" and info.message == "outer"
    assert "inner cause" in info.traceback


text = st.text(st.characters(exclude_categories=("Cs",)), max_size=50)


@FAST
@given(type_=text, message=text, trace=text)
def test_to_data_from_data_round_trip(type_, message, trace):
    info = ErrorInfo(type_, message, trace)
    data = info.to_data()
    assert data == {"type": type_, "message": message, "traceback": trace}
    assert ErrorInfo.from_data(data) == info
    # also across the wire
    assert ErrorInfo.from_data(unpack(pack({"error": data}))["error"]) == info


def test_real_exception_round_trip_over_the_wire():
    info = ErrorInfo.from_exception(raised(ZeroDivisionError("division by zero")))
    received = unpack(pack(m.make(m.ERROR, 9, error=info.to_data())))
    assert m.check(received)["kind"] == m.ERROR
    assert ErrorInfo.from_data(received["error"]) == info


def test_from_data_traceback_is_optional_and_must_be_a_string():
    assert ErrorInfo.from_data({"type": "T", "message": "m"}) == ErrorInfo("T", "m", "")
    assert ErrorInfo.from_data({"type": "T", "message": "m", "traceback": 5}) == ErrorInfo("T", "m", "")
    assert ErrorInfo.from_data({"type": "T", "message": "m", "traceback": None}).traceback == ""


@pytest.mark.parametrize(
    "data",
    [
        None,
        "ValueError: boom",
        ["ValueError", "boom"],
        ("ValueError", "boom"),
        {},
        {"type": "ValueError"},
        {"message": "boom"},
        {"type": 1, "message": "boom"},
        {"type": "ValueError", "message": None},
        {"type": b"ValueError", "message": "boom"},
    ],
)
def test_from_data_rejects_malformed_values(data):
    with pytest.raises(ProtocolError, match="an error must be a map with string 'type' and 'message'"):
        ErrorInfo.from_data(data)


@FAST
@given(
    data=st.one_of(
        st.none(), st.integers(), text, st.lists(text), st.dictionaries(text, st.one_of(st.none(), st.integers(), text))
    )
)
def test_from_data_never_raises_anything_but_protocol_error(data):
    try:
        info = ErrorInfo.from_data(data)
    except ProtocolError:
        assert not (
            isinstance(data, dict) and isinstance(data.get("type"), str) and isinstance(data.get("message"), str)
        )
        return
    assert isinstance(info.type, str) and isinstance(info.message, str) and isinstance(info.traceback, str)


# --------------------------------------------------------------------------- check_control


def registration(**fields) -> dict:
    """A farm worker's HELLO to the broker, as a worker sends it."""
    hello = m.make(
        m.HELLO,
        0,
        version=PROTOCOL_VERSION,
        pid=1234,
        host="node-1",
        slots=8,
        allow=["CartPole-*", "ALE/*"],
        lease=None,
        lessee=None,
        steps=0,
    )
    return {**hello, **fields}


def lease(**fields) -> dict:
    return {
        **m.make(m.LEASE, 3, envs=4, env_id="CartPole-v1", endpoint="tcp://10.0.0.1:4000", server_key=None, add=False),
        **fields,
    }


@pytest.mark.parametrize(
    "message",
    [
        registration(),
        registration(allow=None, lease="0123456789abcdef", lessee=b"T" + bytes(15), trainer_key="k" * 40, steps=10**12),
        registration(allow=[f"Env{i}-*" for i in range(m.MAX_ALLOW)]),
        lease(),
        lease(server_key="k" * 40, add=True),
        {k: v for k, v in lease().items() if k != "add"},  # add is optional
        m.make(m.RELEASE, 1),
        m.make(m.STATUS, 1),
    ],
)
def test_control_messages_within_bounds_pass(message):
    assert m.check_control(unpack(pack(message))) == message


@pytest.mark.parametrize(
    "message, field",
    [
        (registration(allow=nested(1000)), "allow item"),
        (registration(allow=[nested(1000)]), "allow item"),
        (registration(allow=["CartPole-*"] * (m.MAX_ALLOW + 1)), "allow"),
        (registration(allow=["x" * (m.MAX_PATTERN_CHARS + 1)]), "allow item"),
        (registration(allow=["x" * m.MAX_PATTERN_CHARS] * (m.MAX_ALLOW_CHARS // m.MAX_PATTERN_CHARS + 1)), "allow"),
        (registration(allow=[""]), "allow item"),
        (registration(allow="CartPole-*"), "allow"),
        (registration(host="h" * 256), "host"),
        (registration(host=nested(1000)), "host"),
        (registration(slots=0), "slots"),
        (registration(slots=m.MAX_SLOTS + 1), "slots"),
        (registration(slots=True), "slots"),
        (registration(slots=None), "slots"),
        (registration(pid=-1), "pid"),
        (registration(steps=-1), "steps"),
        (registration(steps=None), "steps"),
        (registration(lease="x" * 65), "lease"),
        (registration(lease=nested(1000)), "lease"),
        (registration(lessee="T-a-str"), "lessee"),
        (registration(lessee=b"T" * 256), "lessee"),
        (registration(trainer_key="short"), "trainer_key"),
        (registration(trainer_key=b"k" * 40), "trainer_key"),
        (lease(envs=0), "envs"),
        (lease(envs=1 << 21), "envs"),
        (lease(env_id="x" * 257), "env_id"),
        (lease(endpoint="tcp://" + "h" * 300 + ":1"), "endpoint"),
        (lease(server_key="short"), "server_key"),
        (lease(add=1), "add"),
        (lease(add=nested(1000)), "add"),
    ],
)
def test_control_fields_out_of_bounds_are_refused_by_name(message, field):
    with pytest.raises(ProtocolError, match=rf"{message['kind']} message field '{field}'") as info:
        m.check_control(unpack(pack(message)))
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("kind", [m.CREATE, m.STEP, m.JOIN, m.LEASED, m.RESULT])
def test_control_refuses_kinds_the_broker_does_not_serve(kind):
    with pytest.raises(ProtocolError, match=f"the broker does not serve {kind} messages"):
        m.check_control(well_formed(kind))


def test_a_join_from_an_older_broker_has_no_trainer_key():
    join = m.make(
        m.JOIN, 0, endpoint="tcp://10.0.0.1:4000", server_key=None, lease="0123456789abcdef", trainer=b"T" + bytes(15)
    )
    assert m.check(join) is join


def test_step_and_result_records_round_trip_and_are_never_taken_for_messages() -> None:
    for rid in (0, 1, 2**40, -1):
        assert m.read_step_record([m.step_record(rid)]) == rid
        assert m.read_result_record([m.result_record(rid)])["rid"] == rid
        for record in (m.step_record(rid), m.result_record(rid)):
            with pytest.raises(ProtocolError):
                unpack([record])  # not a map: a peer's garbage of this shape is an error, never a message
    assert m.read_step_record([m.result_record(3)]) is None
    assert m.read_result_record([m.step_record(3)]) is None
    assert m.read_step_record([m.step_record(3), b""]) is None
    assert m.read_step_record([m.step_record(3)[:-1]]) is None
    result = m.check(m.read_result_record([memoryview(m.result_record(7))]))
    assert (result["kind"], result["rid"], result["infos"], result["errors"]) == (m.RESULT, 7, {}, [])
