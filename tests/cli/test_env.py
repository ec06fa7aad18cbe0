"""dymoe.env.env_choice: the one parser of the DYMOE_* environment switches."""

import pytest

from dymoe.env import env_choice
from dymoe.errors import InputError

CHOICES = {"1": "on", "0": "off"}


def test_env_choice_values_default_and_error(monkeypatch):
    monkeypatch.delenv("DYMOE_TEST_SWITCH", raising=False)
    assert env_choice("DYMOE_TEST_SWITCH", CHOICES) is None
    assert env_choice("DYMOE_TEST_SWITCH", CHOICES, "0") == "0"
    monkeypatch.setenv("DYMOE_TEST_SWITCH", "")  # empty: as unset
    assert env_choice("DYMOE_TEST_SWITCH", CHOICES, "1") == "1"
    monkeypatch.setenv("DYMOE_TEST_SWITCH", "0")
    assert env_choice("DYMOE_TEST_SWITCH", CHOICES, "1") == "0"
    monkeypatch.setenv("DYMOE_TEST_SWITCH", "yes")
    with pytest.raises(InputError) as error:
        env_choice("DYMOE_TEST_SWITCH", CHOICES, "1")
    assert str(error.value) == "DYMOE_TEST_SWITCH='yes': use 1 (on) or 0 (off)"


def test_env_override_is_on_off_or_unset(monkeypatch):
    from dymoe.env import env_override

    for value, expected in (("", None), ("1", True), ("0", False)):
        monkeypatch.setenv("DYMOE_TEST_SWITCH", value)
        assert env_override("DYMOE_TEST_SWITCH", "on", "off") is expected
    monkeypatch.setenv("DYMOE_TEST_SWITCH", "on")
    with pytest.raises(InputError, match=r"^DYMOE_TEST_SWITCH='on': use 1 \(on\) or 0 \(off\)$"):
        env_override("DYMOE_TEST_SWITCH", "on", "off")
