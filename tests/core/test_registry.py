import pytest

from tunelab.core.registry import Registry


def test_register_get_and_errors():
    table = Registry("widget")

    @table.register("b", paper="https://arxiv.org/abs/1")
    class B:
        pass

    @table.register("a")
    class A:
        pass

    assert table.get("b") is B and (B.name, B.paper) == ("b", "https://arxiv.org/abs/1") and A.paper is None
    assert list(table.sorted()) == ["a", "b"] and "a" in table and "c" not in table
    with pytest.raises(KeyError, match="unknown widget 'c'; known: a, b"):
        table.get("c")
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        table.register("a")(type("Other", (), {}))
    table.register("a")(A)  # re-registering the same class (a module imported twice) is fine


def test_discovery_and_unknown_name_error():
    """A table with a package imports its modules on the first lookup; an unknown name is `UnknownName`, a
    KeyError of its own type whose message is the sentence itself (not KeyError's repr)."""
    from tunelab.core.registry import UnknownName
    from tunelab.methods.registry import _METHODS

    assert "lora" in _METHODS and "mezo" in _METHODS  # found by discovery, nothing lists the modules
    with pytest.raises(UnknownName) as err:
        _METHODS.get("nope")
    assert str(err.value).startswith("unknown method 'nope'; known: ") and not str(err.value).startswith('"')
