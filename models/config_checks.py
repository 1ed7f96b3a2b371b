"""The error a wrong config raises, and the checks the sections of models/config.py make with it."""

from __future__ import annotations

from utils.errors import UserError


class ConfigError(UserError):
    """The config file, a key or a value is wrong."""


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    check(value in choices, f"{name} must be one of {', '.join(choices)} (got {value!r})")


def exactly_one(section: str, obj: object, a: str, b: str, what: str) -> None:
    """Two keys that give the same thing two ways: exactly one of them is non-zero."""
    x, y = getattr(obj, a), getattr(obj, b)
    check(not (x and y), f"{section}.{a}={x} and {section}.{b}={y} both set {what}: keep one (the other 0)")
    check(bool(x or y), f"one of {section}.{a} and {section}.{b} must be positive: they set {what}")


def non_negative(section: str, obj: object, *names: str) -> None:
    for name in names:
        check(getattr(obj, name) >= 0, f"{section}.{name} must be >= 0 (got {getattr(obj, name)})")


def positive(section: str, obj: object, *names: str) -> None:
    for name in names:
        check(getattr(obj, name) > 0, f"{section}.{name} must be positive (got {getattr(obj, name)})")
