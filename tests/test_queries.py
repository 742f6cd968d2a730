"""Query generators recompute correctly; imports and selectors behave."""

from __future__ import annotations

import re

import pytest
from helpers import catalog_rows

from curator.catalog.database import Catalog
from curator.errors import BadInputError, CuratorError
from curator.catalog.querygen import FAMILIES, GENERATORS, generate
from curator.catalog.queries import read_query_file, select_queries, store_queries

EQUATION = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")


def check_equations(text: str) -> int:
    """Every `a op b = c` in the text holds; returns how many there were."""
    found = 0
    for a, op, b, c in EQUATION.findall(text):
        a, b, c = int(a), int(b), int(c)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
        assert value == c, f"{a} {op} {b} != {c} in {text!r}"
        found += 1
    return found


def test_arithmetic_is_recomputed_from_the_text():
    for q in generate("arithmetic", 300, seed=7):
        a, op, b, c = re.search(r"\((\d+) ([+-]) (\d+)\) \* (\d+)", q.prompt).groups()
        a, b, c = int(a), int(b), int(c)
        assert all(0 <= x <= 20 for x in (a, b, c))
        result = (a + b if op == "+" else a - b) * c
        assert result > 0 and q.answer == str(result)
        assert q.prompt.endswith("\n\nThink step-by-step.")
        assert check_equations(q.completion) >= 2
        assert q.completion.rstrip(".").endswith(str(result))


def test_slope_is_recomputed_from_the_text():
    for q in generate("slope", 300, seed=1):
        x1, y1, x2, y2 = map(int, re.search(r"\((\d+), (\d+)\) and \((\d+), (\d+)\)", q.prompt).groups())
        assert all(0 <= v <= 100 for v in (x1, y1, x2, y2)) and x1 != x2
        assert (y2 - y1) % (x2 - x1) == 0
        assert q.answer == str((y2 - y1) // (x2 - x1))
        assert check_equations(q.completion) == 3


def test_linear_is_recomputed_from_the_text():
    for q in generate("linear", 300, seed=2):
        a, b, c = map(int, re.search(r"(\d+)x \+ (\d+) = (\d+)", q.prompt).groups())
        assert all(0 <= v <= 100 for v in (a, b, c))
        x = int(q.answer)
        assert x > 0 and a * x + b == c
        assert check_equations(q.completion) == 2


def test_controls_restate_what_the_prompt_says():
    for q in generate("reasoning-control", 50, seed=3):
        number = re.search(r"Find the answer: (\d+) ", q.prompt).group(1)
        assert q.answer == number and f"The answer is {number}." in q.completion
    for q in generate("factual-control", 50, seed=3):
        assert q.answer in q.prompt and q.completion in q.prompt


def test_seeds_reproduce_and_prefixes_are_stable():
    for task in GENERATORS:
        assert generate(task, 20, seed=5) == generate(task, 20, seed=5)
        assert generate(task, 20, seed=5)[:10] == generate(task, 10, seed=5)
        assert [q.prompt for q in generate(task, 10, seed=5)] != [q.prompt for q in generate(task, 10, seed=6)]
        assert len({q.id for q in generate(task, 50, seed=5)}) == 50
    with pytest.raises(CuratorError, match="no generator"):
        generate("poetry", 3)


def test_import_select_and_conflicts(ws, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "f1", "task": "factual", "prompt": "Capital of France?", "completion": "Paris.", '
                    '"answer": "Paris"}\n\n{"id": "f2", "task": "factual", "prompt": "2+2?", "completion": "4", '
                    '"answer": 4}\n')
    queries = read_query_file(path)
    assert [q.answer for q in queries] == ["Paris", "4"] and queries[0].query_set == "mine"
    with Catalog.open(ws, write=True) as catalog:
        assert store_queries(catalog, queries).added == 2
        assert store_queries(catalog, queries).unchanged == 2
        store_queries(catalog, generate("slope", 3))
        assert [q.id for q in select_queries(catalog, "factual")] == ["f1", "f2"]
        assert len(select_queries(catalog, "slope-s0,f1")) == 4
        assert len(select_queries(catalog, "all")) == 5
        with pytest.raises(CuratorError, match="no query matches 'nope'"):
            select_queries(catalog, "nope")
        changed = queries[0].model_copy(update={"completion": "Lyon."})
        with pytest.raises(CuratorError, match="already holds with other content"):
            store_queries(catalog, [changed])
    assert catalog_rows(ws, "SELECT completion FROM queries WHERE id = 'f1'") == [("Paris.",)]


@pytest.mark.parametrize("line, message", [
    ('{"id": "x", "task": "t", "prompt": "p"}', r"mine.jsonl:2: field 'completion'"),
    ('{"id": "x", "task": "t", "prompt": "p", "completion": ""}', r"mine.jsonl:2: field 'completion'"),
    ("not json", r"mine.jsonl:2: not valid JSON"),
    ('["a"]', r"mine.jsonl:2: expected a JSON object"),
    ('{"id": "a", "task": "t", "prompt": "p", "completion": "c"}', r"mine.jsonl:2: id 'a' already used on line 1"),
])
def test_bad_query_files_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a", "task": "t", "prompt": "p", "completion": "c"}\n' + line + "\n")
    with pytest.raises(BadInputError, match=message):
        read_query_file(path)


# -- held-out families: the same tasks written the way other people write them ----------------

REASONING = ("arithmetic", "slope", "linear")


def skeleton_lines(text: str) -> set[str]:
    """A text's lines with every number replaced, so two queries share a line only by template."""
    return {re.sub(r"-?\d+(\.\d+)?", "#", line).strip() for line in text.splitlines() if line.strip()}


def test_held_out_families_share_no_template_with_each_other():
    for task in REASONING:
        lines = {family: set() for family in FAMILIES}
        for family in FAMILIES:
            for q in generate(task, 40, seed=5, family=family):
                lines[family] |= skeleton_lines(q.prompt) | skeleton_lines(q.completion)
        for a in FAMILIES:
            for b in FAMILIES:
                if a < b:
                    shared = lines[a] & lines[b]
                    assert not shared, f"{task}: {a} and {b} share {sorted(shared)[:3]}"


def run_program(prompt: str) -> str:
    """The output of the Python program in a code-family prompt."""
    import contextlib
    import io

    source = re.search(r"```python\n(.*?)```", prompt, re.S).group(1)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(source, {})       # generated arithmetic only: no imports, no I/O
    return buffer.getvalue().strip()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "paper"])
def test_every_family_is_recomputed_from_its_own_text(family):
    for task in REASONING:
        for q in generate(task, 100, seed=9, family=family):
            answer = int(q.answer)
            assert q.id.startswith(f"{task}-{family}-s9-") and q.metadata == {"family": family}
            last_number = re.findall(r"-?\d+(?:\.\d+)?", q.completion)[-1]
            assert float(last_number) == answer, q.completion      # the completion ends on the answer
            if family == "code":
                printed = run_program(q.prompt)
                assert float(printed) == answer and q.completion.rstrip("`\n").endswith(printed)
                continue
            numbers = [int(n) for n in re.findall(r"\d+", q.prompt)]
            if task == "arithmetic":
                a, b, c = numbers
                plus = "+" in q.prompt or "plus" in q.prompt or "add " in q.prompt
                assert answer == (a + b if plus else a - b) * c
            elif task == "slope":
                x1, y1, x2, y2 = [int(n) for n in re.findall(r"\d+", q.prompt)]
                assert answer * (x2 - x1) == y2 - y1
            else:
                a, b, c = numbers[:3]
                assert a * answer + b == c


def test_families_draw_their_own_problems_and_controls_have_only_the_papers():
    paper = {q.prompt for q in generate("linear", 50, seed=0)}
    terse = generate("linear", 50, seed=0, family="terse")
    assert paper.isdisjoint(q.prompt for q in terse)
    assert generate("linear", 5, seed=0, family="paper") == generate("linear", 5, seed=0)
    with pytest.raises(CuratorError, match="only the paper's family"):
        generate("reasoning-control", 3, family="chat")
    with pytest.raises(CuratorError, match="no query family"):
        generate("slope", 3, family="haiku")
