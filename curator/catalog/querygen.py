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
from dataclasses import dataclass

from curator.catalog.queries import Query
from curator.constants import QUERY_FAMILIES
from curator.errors import CuratorError

STEP_BY_STEP = "\n\nThink step-by-step."


# -- the reasoning tasks: a problem is drawn once, then written in one of several families -------

@dataclass(frozen=True)
class Arithmetic:
    a: int
    op: str
    b: int
    c: int

    @property
    def inner(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def answer(self) -> int:
        return self.inner * self.c


@dataclass(frozen=True)
class Slope:
    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def dx(self) -> int:
        return self.x2 - self.x1

    @property
    def dy(self) -> int:
        return self.y2 - self.y1

    @property
    def answer(self) -> int:
        return self.dy // self.dx


@dataclass(frozen=True)
class Linear:
    a: int
    b: int
    c: int

    @property
    def answer(self) -> int:
        return (self.c - self.b) // self.a


def _draw_arithmetic(rng: random.Random) -> Arithmetic:
    while True:
        a, b, c = rng.randint(0, 20), rng.randint(0, 20), rng.randint(0, 20)
        problem = Arithmetic(a, rng.choice("+-"), b, c)
        if problem.answer > 0:
            return problem


def _draw_slope(rng: random.Random) -> Slope:
    while True:
        x1, x2 = rng.randint(0, 100), rng.randint(0, 100)
        dx = x2 - x1
        if dx == 0:
            continue
        y1 = rng.randint(0, 100)
        # An integer slope keeps the answer an integer with y2 still in 0..100.
        slopes = [m for m in range(-100, 101) if 0 <= y1 + m * dx <= 100]
        return Slope(x1, y1, x2, y1 + rng.choice(slopes) * dx)


def _draw_linear(rng: random.Random) -> Linear:
    while True:
        a, b, c = rng.randint(1, 100), rng.randint(0, 100), rng.randint(0, 100)
        if c - b > 0 and (c - b) % a == 0:
            return Linear(a, b, c)


# The paper's family (Ruis et al. 2024): the format sketch suites are built from.

def _arithmetic_paper(p: Arithmetic) -> tuple[str, str]:
    prompt = f"Calculate the answer: ({p.a} {p.op} {p.b}) * {p.c}" + STEP_BY_STEP
    completion = (
        f"First, work out the part in parentheses: {p.a} {p.op} {p.b} = {p.inner}.\n"
        f"Then multiply the result by {p.c}: {p.inner} * {p.c} = {p.answer}.\n"
        f"So ({p.a} {p.op} {p.b}) * {p.c} = {p.answer}. The answer is {p.answer}."
    )
    return prompt, completion


def _slope_paper(p: Slope) -> tuple[str, str]:
    prompt = (f"What is the slope of the line passing through the points ({p.x1}, {p.y1}) and ({p.x2}, {p.y2})?"
              + STEP_BY_STEP)
    completion = (
        "The slope of a line through two points is (y2 - y1) / (x2 - x1).\n"
        f"The change in y is {p.y2} - {p.y1} = {p.dy}.\n"
        f"The change in x is {p.x2} - {p.x1} = {p.dx}.\n"
        f"Dividing gives {p.dy} / {p.dx} = {p.answer}.\n"
        f"The slope is {p.answer}."
    )
    return prompt, completion


def _linear_paper(p: Linear) -> tuple[str, str]:
    prompt = f"Solve for x: {p.a}x + {p.b} = {p.c}" + STEP_BY_STEP
    completion = (
        f"Subtract {p.b} from both sides: {p.a}x = {p.c} - {p.b} = {p.c - p.b}.\n"
        f"Divide both sides by {p.a}: x = {p.c - p.b} / {p.a} = {p.answer}.\n"
        f"So x = {p.answer}."
    )
    return prompt, completion


# Held-out families: the same problems as other people write them. They share no template
# with the paper's (tests/test_queries.py checks it), so a sketch built from paper-format
# suites is measured on queries that differ the way users' queries differ.

def _signed(op: str) -> str:
    return "plus" if op == "+" else "minus"


def _arithmetic_terse(p: Arithmetic) -> tuple[str, str]:
    return f"({p.a}{p.op}{p.b})*{p.c} =", f" {p.inner}*{p.c} = {p.answer}"


def _arithmetic_prose(p: Arithmetic) -> tuple[str, str]:
    verb = "add" if p.op == "+" else "take away"
    prompt = f"Start with {p.a}, {verb} {p.b}, and multiply what you get by {p.c}. What number do you end up with?"
    first = f"Adding {p.b} to {p.a} gives" if p.op == "+" else f"Taking {p.b} away from {p.a} leaves"
    completion = (f" {first} {p.inner}; multiplying {p.inner} by {p.c} then makes {p.answer}, so you end up "
                  f"with {p.answer}.")
    return prompt, completion


def _arithmetic_code(p: Arithmetic) -> tuple[str, str]:
    prompt = f"```python\nvalue = ({p.a} {p.op} {p.b}) * {p.c}\nprint(value)\n```\nWhat does this program print?"
    completion = (f"\n`({p.a} {p.op} {p.b})` evaluates to `{p.inner}`, and `{p.inner} * {p.c}` to `{p.answer}`, "
                  f"so it prints:\n```\n{p.answer}\n```")
    return prompt, completion


def _arithmetic_chat(p: Arithmetic) -> tuple[str, str]:
    prompt = f"User: quick one, what's {p.a} {_signed(p.op)} {p.b}, all times {p.c}?\nAssistant:"
    completion = f" Sure! {p.a} {_signed(p.op)} {p.b} is {p.inner}, and {p.inner} times {p.c} is {p.answer}. 🙂"
    return prompt, completion


def _slope_terse(p: Slope) -> tuple[str, str]:
    return (f"slope of ({p.x1},{p.y1})-({p.x2},{p.y2}):",
            f" ({p.y2}-{p.y1})/({p.x2}-{p.x1}) = {p.dy}/{p.dx} = {p.answer}")


def _slope_prose(p: Slope) -> tuple[str, str]:
    prompt = (f"A straight line goes through ({p.x1}, {p.y1}) and through ({p.x2}, {p.y2}). How steep is it, "
              f"that is, what is its gradient?")
    completion = (f" Going from the first point to the second, the line rises by {p.dy} while it runs {p.dx} "
                  f"across. Rise over run is {p.dy} divided by {p.dx}, which is {p.answer}; the gradient is "
                  f"{p.answer}.")
    return prompt, completion


def _slope_code(p: Slope) -> tuple[str, str]:
    prompt = (f"```python\ndef slope(p, q):\n    return (q[1] - p[1]) / (q[0] - p[0])\n\n"
              f"print(slope(({p.x1}, {p.y1}), ({p.x2}, {p.y2})))\n```\nWhat is the output?")
    completion = (f"\nThe numerator is `{p.y2} - {p.y1}` = `{p.dy}` and the denominator `{p.x2} - {p.x1}` = "
                  f"`{p.dx}`, so the output is:\n```\n{p.dy / p.dx!r}\n```")
    return prompt, completion


def _slope_chat(p: Slope) -> tuple[str, str]:
    prompt = f"User: my line passes through ({p.x1}, {p.y1}) and ({p.x2}, {p.y2}). slope??\nAssistant:"
    completion = (f" Happy to help! The y-values differ by {p.dy} and the x-values by {p.dx}, and {p.dy} over "
                  f"{p.dx} gives a slope of {p.answer}.")
    return prompt, completion


def _linear_terse(p: Linear) -> tuple[str, str]:
    return f"{p.a}x+{p.b}={p.c}, x=", f" ({p.c}-{p.b})/{p.a} = {p.answer}"


def _linear_prose(p: Linear) -> tuple[str, str]:
    prompt = (f"I think of a number, multiply it by {p.a} and then add {p.b}, and I get {p.c}. Which number did I "
              f"think of?")
    completion = (f" Undo the adding first: {p.c} without the {p.b} is {p.c - p.b}. Then undo the multiplying: "
                  f"{p.c - p.b} shared into {p.a} equal parts is {p.answer}. You thought of {p.answer}.")
    return prompt, completion


def _linear_code(p: Linear) -> tuple[str, str]:
    prompt = (f"```python\nfor x in range(1, 101):\n    if {p.a} * x + {p.b} == {p.c}:\n        print(x)\n```\n"
              f"Which value of x gets printed?")
    completion = (f"\nThe condition holds when `{p.a} * x == {p.c - p.b}`, that is for `x == {p.answer}`, so it "
                  f"prints:\n```\n{p.answer}\n```")
    return prompt, completion


def _linear_chat(p: Linear) -> tuple[str, str]:
    prompt = f"User: stuck on my homework: {p.a}x + {p.b} = {p.c}. what's x?\nAssistant:"
    completion = (f" No problem! Move the {p.b} over to get {p.a}x = {p.c - p.b}, then divide by {p.a}: "
                  f"x comes out as {p.answer}.")
    return prompt, completion


PAPER = "paper"
FAMILIES = QUERY_FAMILIES
HELD_OUT_FAMILIES = tuple(f for f in FAMILIES if f != PAPER)

_PROBLEMS = {"arithmetic": _draw_arithmetic, "slope": _draw_slope, "linear": _draw_linear}
_RENDERERS = {
    "arithmetic": {"paper": _arithmetic_paper, "terse": _arithmetic_terse, "prose": _arithmetic_prose,
                   "code": _arithmetic_code, "chat": _arithmetic_chat},
    "slope": {"paper": _slope_paper, "terse": _slope_terse, "prose": _slope_prose, "code": _slope_code,
              "chat": _slope_chat},
    "linear": {"paper": _linear_paper, "terse": _linear_terse, "prose": _linear_prose, "code": _linear_code,
               "chat": _linear_chat},
}


def _reasoning(task: str, family: str) -> Callable[[random.Random], tuple[str, str, int]]:
    def make(rng: random.Random) -> tuple[str, str, int]:
        problem = _PROBLEMS[task](rng)
        return (*_RENDERERS[task][family](problem), problem.answer)
    return make


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
    "arithmetic": _reasoning("arithmetic", PAPER),
    "slope": _reasoning("slope", PAPER),
    "linear": _reasoning("linear", PAPER),
    "factual-control": _factual_control,
    "reasoning-control": _reasoning_control,
}


def family_of(query: Query) -> str:
    """The family a query was written in: the paper's unless its metadata names another."""
    return (query.metadata or {}).get("family", PAPER)


def generate(task: str, n: int, seed: int = 0, family: str = PAPER) -> list[Query]:
    """n queries of a task in one family of formats. The paper's family has ids TASK-sSEED-NNNN (query
    set TASK-sSEED); another family F has TASK-F-sSEED-NNNN (set TASK-F-sSEED) and draws its own
    problems, so no held-out query repeats a suite's numbers by construction."""
    if task not in GENERATORS:
        raise CuratorError(f"no generator for task {task!r}; tasks: {', '.join(GENERATORS)}")
    if family not in FAMILIES:
        raise CuratorError(f"no query family {family!r}; families: {', '.join(FAMILIES)}")
    if family != PAPER and task not in _RENDERERS:
        raise CuratorError(f"task {task!r} has only the paper's family; families exist for "
                           f"{', '.join(_RENDERERS)}")
    if n < 1:
        raise CuratorError("--n must be at least 1")
    make = GENERATORS[task] if family == PAPER else _reasoning(task, family)
    stem = task if family == PAPER else f"{task}-{family}"
    queries = []
    for i in range(n):
        stream = f"{task}:{seed}:{i}" if family == PAPER else f"{task}:{family}:{seed}:{i}"
        prompt, completion, answer = make(random.Random(stream))
        queries.append(Query(id=f"{stem}-s{seed}-{i:04d}", task=task, prompt=prompt,
                             completion=completion, answer=str(answer), query_set=f"{stem}-s{seed}",
                             metadata=None if family == PAPER else {"family": family}))
    return queries
