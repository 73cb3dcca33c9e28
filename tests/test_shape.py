"""The shape of serve_package.py, checked as the module grows: the sections the docstring's map
names are the ones the source has, in that order; a section never names what a later one
defines (the data flows down the file); no class or function past its size (250 lines a class, 50 a function)."""

import ast
import os
import re

import pytest

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "serve_package.py")
MAX_CLASS, MAX_FUNCTION = 250, 50
KNOWN_UPWARD = set()  # type: set


@pytest.fixture(scope="module")
def module():
    with open(SOURCE, encoding="utf-8") as f:
        text = f.read()
    return text, ast.parse(text)


def sections(text):
    """(first line, number, title) of each '# N. Title' header between two rules."""
    lines = text.split("\n")
    return [(i, int(m.group(1)), m.group(2)) for i, line in enumerate(lines, 1)
            for m in [re.match(r"# (\d+)\. (.+)", line)]
            if m and lines[i - 2].startswith("# ---") and lines[i].startswith("# ---")]


def section_of(headers, lineno):
    return max([number for line, number, _ in headers if line <= lineno] or [0])


def test_the_map_names_the_sections_in_their_order(module):
    text, tree = module
    headers = sections(text)
    assert [n for _, n, _ in headers] == list(range(1, len(headers) + 1))
    mapped = re.findall(r"^ {1,2}(\d+)\. (\S+(?: \S+)*?)(?:  |$)", ast.get_docstring(tree),
                        re.M)
    assert [int(n) for n, _ in mapped] == [n for _, n, _ in headers]
    for (_, title), (_, _, header) in zip(mapped, headers):
        assert header.lower().startswith(title.lower()), (title, header)


def test_no_section_names_what_a_later_one_defines(module):
    text, tree = module
    headers = sections(text)
    owner = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            t.id for t in getattr(node, "targets", [getattr(node, "target", None)])
            if isinstance(t, ast.Name)]
        for name in names:
            owner[name] = section_of(headers, node.lineno)
    upward = set()
    for node in tree.body:
        here = section_of(headers, node.lineno)
        for sub in ast.walk(node):
            name = sub.id if isinstance(sub, ast.Name) else (  # or an annotation in quotes
                sub.value if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
                and re.fullmatch(r"[A-Z]\w*", sub.value) else None)
            if name in owner and owner[name] > here:
                upward.add((getattr(node, "name", "?"), name))
    assert upward == KNOWN_UPWARD


def test_no_class_or_function_past_its_size(module):
    _, tree = module
    too_long = ["%s: %d lines" % (node.name, node.end_lineno - node.lineno + 1)
                for node in ast.walk(tree)
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= MAX_CLASS
                or isinstance(node, ast.FunctionDef)
                and node.end_lineno - node.lineno >= MAX_FUNCTION]
    assert too_long == []
