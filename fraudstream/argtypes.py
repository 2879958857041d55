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
