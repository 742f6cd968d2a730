"""Query generators in the formats of Ruis et al. (2024), with worked completions.

Each generator makes query i of a seed from its own random stream, so a run
with --n 20 starts with the same 10 queries as --n 10, and a seed always gives
the same text. Completions spell out every intermediate step with correct
integer arithmetic; answers are integers.

Formats (../shared/DESIGN.md, "Queries"):
- arithmetic: ``Calculate the answer: (a + b) * c`` or ``(a - b) * c``, operands
  0-20, positive result;
- slope: the slope of the line through (x1, y1) and (x2, y2), coordinates 0-100;
- linear: ``Solve for x: ax + b = c``, coefficients 0-100, positive integer x;
- reasoning-control: restate a number given in the prompt;
- factual-control: recall a fictional fact stated in the prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from curator.catalog.queries import Query
from curator.errors import CuratorError

STEP_BY_STEP = "\n\nThink step-by-step."


def _arithmetic(rng: random.Random) -> tuple[str, str, int]:
    while True:
        a, b, c = rng.randint(0, 20), rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice("+-")
        inner = a + b if op == "+" else a - b
        result = inner * c
        if result > 0:
            break
    prompt = f"Calculate the answer: ({a} {op} {b}) * {c}" + STEP_BY_STEP
    completion = (
        f"First, work out the part in parentheses: {a} {op} {b} = {inner}.\n"
        f"Then multiply the result by {c}: {inner} * {c} = {result}.\n"
        f"So ({a} {op} {b}) * {c} = {result}. The answer is {result}."
    )
    return prompt, completion, result


def _slope(rng: random.Random) -> tuple[str, str, int]:
    while True:
        x1, x2 = rng.randint(0, 100), rng.randint(0, 100)
        dx = x2 - x1
        if dx == 0:
            continue
        y1 = rng.randint(0, 100)
        # An integer slope keeps the answer an integer with y2 still in 0..100.
        slopes = [m for m in range(-100, 101) if 0 <= y1 + m * dx <= 100]
        slope = rng.choice(slopes)
        y2 = y1 + slope * dx
        break
    dy = y2 - y1
    prompt = (f"What is the slope of the line passing through the points ({x1}, {y1}) and ({x2}, {y2})?"
              + STEP_BY_STEP)
    completion = (
        "The slope of a line through two points is (y2 - y1) / (x2 - x1).\n"
        f"The change in y is {y2} - {y1} = {dy}.\n"
        f"The change in x is {x2} - {x1} = {dx}.\n"
        f"Dividing gives {dy} / {dx} = {slope}.\n"
        f"The slope is {slope}."
    )
    return prompt, completion, slope


def _linear(rng: random.Random) -> tuple[str, str, int]:
    while True:
        a, b, c = rng.randint(1, 100), rng.randint(0, 100), rng.randint(0, 100)
        if c - b > 0 and (c - b) % a == 0:
            x = (c - b) // a
            break
    prompt = f"Solve for x: {a}x + {b} = {c}" + STEP_BY_STEP
    completion = (
        f"Subtract {b} from both sides: {a}x = {c} - {b} = {c - b}.\n"
        f"Divide both sides by {a}: x = {c - b} / {a} = {x}.\n"
        f"So x = {x}."
    )
    return prompt, completion, x


_THINGS = [("beagles", "bought by a kennel"), ("apples", "picked in an orchard"),
           ("books", "returned to the library"), ("tickets", "sold for the concert"),
           ("bricks", "laid on the wall"), ("letters", "posted this morning"),
           ("chairs", "set out in the hall"), ("seeds", "planted in the garden")]


def _reasoning_control(rng: random.Random) -> tuple[str, str, int]:
    number = rng.randint(1, 100)
    noun, event = rng.choice(_THINGS)
    prompt = (f"Find the answer: {number} {noun} were {event}. How many {noun} were {event}?"
              + STEP_BY_STEP)
    completion = (f"The question states that {number} {noun} were {event}.\n"
                  f"Nothing else changes that number.\nThe answer is {number}.")
    return prompt, completion, number


_SYLLABLES = ["zor", "bla", "vek", "tan", "quo", "rin", "mel", "dax", "ul", "ix", "pra", "ven"]
_FACT_TEMPLATES = [
    ("the planet {name}", "moons", "The planet {name} has {n} moons. How many moons does the planet {name} have?",
     "The planet {name} has {n} moons."),
    ("the river {name}", "bridges", "The river {name} is crossed by {n} bridges. How many bridges cross "
     "the river {name}?", "The river {name} is crossed by {n} bridges."),
    ("the city of {name}", "towers", "The city of {name} has {n} towers. How many towers does the city of "
     "{name} have?", "The city of {name} has {n} towers."),
]


def _factual_control(rng: random.Random) -> tuple[str, str, int]:
    name = "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
    n = rng.randint(2, 99)
    _, _, question, answer = rng.choice(_FACT_TEMPLATES)
    return question.format(name=name, n=n), answer.format(name=name, n=n), n


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, int]]] = {
    "arithmetic": _arithmetic,
    "slope": _slope,
    "linear": _linear,
    "factual-control": _factual_control,
    "reasoning-control": _reasoning_control,
}


def generate(task: str, n: int, seed: int = 0) -> list[Query]:
    if task not in GENERATORS:
        raise CuratorError(f"no generator for task {task!r}; tasks: {', '.join(GENERATORS)}")
    if n < 1:
        raise CuratorError("--n must be at least 1")
    make = GENERATORS[task]
    queries = []
    for i in range(n):
        prompt, completion, answer = make(random.Random(f"{task}:{seed}:{i}"))
        queries.append(Query(id=f"{task}-s{seed}-{i:04d}", task=task, prompt=prompt,
                             completion=completion, answer=str(answer),
                             query_set=f"{task}-s{seed}"))
    return queries
