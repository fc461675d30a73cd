import pytest
from pydantic import BaseModel, Field
import datetime

from microcores import MicroCore
from microcores.core import validate_model
from microcores.errors import InvalidInput, Unavailable
from microcores.services import Compute, ComputeAndClassify


class UserIn(BaseModel):
    id: int = Field(ge=1, le=1000)
    name: str = Field(min_length=1)
    born: datetime.date | None = None


class UserOut(BaseModel):
    ok: bool


def test_subclass_declares_models_from_generic_parameters():
    class Svc(MicroCore[UserIn, UserOut]):
        name = "users.check"

        def process(self, data: UserIn) -> UserOut:
            return UserOut(ok=True)

    assert Svc.input_model is UserIn and Svc.output_model is UserOut
    assert Svc().run({"id": 3, "name": "x"}) == {"ok": True}


@pytest.mark.parametrize("bad", ["users", "Users.check", "users.check.more", "users.", "1x.y"])
def test_bad_service_names_are_refused(bad):
    with pytest.raises(TypeError, match="group.function"):
        class Svc(MicroCore[UserIn, UserOut]):
            name = bad


def test_missing_models_are_refused():
    with pytest.raises(TypeError, match="must declare its models"):
        class Svc(MicroCore):  # type: ignore[type-arg]
            name = "a.b"


@pytest.mark.parametrize("raw,message,field", [
    ({"name": "x"}, "id is required", "id"),
    ({"id": "abc", "name": "x"}, "id must be an integer", "id"),
    ({"id": 0, "name": "x"}, "id is out of range: must be >= 1", "id"),
    ({"id": 5000, "name": "x"}, "id is out of range: must be <= 1000", "id"),
    ({"id": 1, "name": ""}, "name cannot be empty", "name"),
    ({"id": 1, "name": "x", "born": "31/12/2000"}, "born must be a date in YYYY-MM-DD format", "born"),
])
def test_validation_messages_name_the_field(raw, message, field):
    with pytest.raises(InvalidInput) as e:
        validate_model(UserIn, raw)
    assert message in e.value.message
    assert e.value.field == field


def test_json_input_that_is_not_an_object():
    with pytest.raises(InvalidInput, match="JSON object"):
        validate_model(UserIn, b"[1, 2]")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        validate_model(UserIn, b"{nope")


def test_builtin_compute_and_division_by_zero():
    assert Compute().run({"a": 6, "b": 3, "op": "div"}) == {"result": 2.0}
    with pytest.raises(InvalidInput, match="b must not be 0"):
        Compute().run({"a": 6, "b": 0, "op": "div"})


def test_nested_call_outside_microswarm_says_what_to_do():
    with pytest.raises(Unavailable, match="microcores.Client"):
        ComputeAndClassify().run({"a": 1, "b": 2})
