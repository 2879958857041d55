"""argparse value types shared by the subcommands: bad values fail as one usage line."""

from __future__ import annotations

import argparse


def _number(text: str, convert, what: str):
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    number = _number(text, int, "a whole number")
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def count(text: str) -> int:
    number = _number(text, int, "a whole number")
    if number < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def seconds(text: str) -> float:
    number = _number(text, float, "a number of seconds")
    if number < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def property_pair(text: str) -> str:
    """KEY=VALUE of a client property. The message never repeats the text: the value may be a secret."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            "wants KEY=VALUE (a client property), got an item without '=' or without a key"
        )
    return text
