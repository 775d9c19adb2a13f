"""Arithmetic word problems made in the repo from a seed: no data set to download, a known
answer for every problem, and a difficulty knob. Level L is a story of L steps on one
running count (level 1: one addition or subtraction with small numbers; level 2 adds
"k bags of m" multiplications; level 3 and up add halving and doubling, with bigger
numbers). Every intermediate count stays a positive integer."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

NAMES = ("Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Kenji")
ITEMS = ("apples", "stickers", "marbles", "coins", "books", "pencils", "shells", "cards")
FRIENDS = ("a friend", "her brother", "his sister", "a neighbour", "the teacher", "a classmate")
INSTRUCTION = (
    "Solve the problem step by step, briefly. End with 'The answer is N.' where N is a number."
)


@dataclass(frozen=True)
class Problem:
    level: int
    question: str
    answer: int

    @property
    def prompt(self) -> str:
        return f"{self.question}\n{INSTRUCTION}"


# A step: (value, rng, item) -> (new value, sentence) or None when it does not fit the value.
Step = Callable[[int, random.Random, str, str], tuple[int, str] | None]


def _add(v: int, rng: random.Random, name: str, item: str) -> tuple[int, str]:
    a = rng.randint(2, 9 + 10 * min(v, 90) // 10)
    verb = rng.choice(("finds", "buys", "is given", "wins"))
    return v + a, f"{name} {verb} {a} more {item}."


def _sub(v: int, rng: random.Random, name: str, item: str) -> tuple[int, str] | None:
    if v < 3:
        return None
    a = rng.randint(1, v - 1)
    return v - a, f"{name} gives {a} {item} to {rng.choice(FRIENDS)}."


def _bags(v: int, rng: random.Random, name: str, item: str) -> tuple[int, str]:
    k, m = rng.randint(2, 6), rng.randint(3, 12)
    return v + k * m, f"{name} buys {k} bags with {m} {item} in each bag."


def _half(v: int, rng: random.Random, name: str, item: str) -> tuple[int, str] | None:
    if v % 2:
        return None
    return v // 2, f"{name} gives away half of the {item}."


def _double(v: int, rng: random.Random, name: str, item: str) -> tuple[int, str] | None:
    if v > 150:
        return None
    return 2 * v, f"Then the number of {item} {name} has doubles."


def steps_for(level: int) -> tuple[Step, ...]:
    if level <= 1:
        return (_add, _sub)
    if level == 2:
        return (_add, _sub, _bags)
    return (_add, _sub, _bags, _half, _double)


def make_problem(level: int, rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(5, 20 * level + 10)
    sentences = [f"{name} has {value} {item}."]
    kinds = steps_for(level)
    while len(sentences) <= level:
        step = rng.choice(kinds)
        if len(sentences) > 1 and step in (_add, _sub) and level >= 3 and rng.random() < 0.5:
            continue  # harder levels lean on the multiplicative steps
        done = step(value, rng, name, item)
        if done is None:
            continue
        value, sentence = done
        sentences.append(sentence)
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return Problem(level, question, value)


def make_problems(per_level: int, levels: tuple[int, ...], seed: int = 0) -> list[Problem]:
    """``per_level`` problems of each level, the same for the same seed."""
    rng = random.Random(seed)
    return [make_problem(level, rng) for level in levels for _ in range(per_level)]
