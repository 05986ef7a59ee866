"""The codebase's shape, as its readers rely on it: scripts import libraries, a library never
imports a script, no import cycles; and the product cites only documents that ship with it."""

import ast
import os
import re

from tests.conftest import ROOT

SKIP = {"tests", "demo", "benchmarks", "experiments", "docs", "__pycache__"}


def modules():
    """{module name: path} of the project's own Python files, scripts and libraries."""
    found = {}
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in SKIP]
        for n in names:
            if n.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, n), ROOT)
                found[rel[:-3].replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(d, n)
    return found


def imports(mod, path, known):
    """The project modules `mod` imports (relative imports resolved)."""
    deps = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = mod.rsplit(".", node.level)[0] if "." in mod else ""
            names = [".".join(x for x in (base, node.module) if x)]
        else:
            continue
        for name in names:
            while name and not (name in known and name != mod):
                name = name.rpartition(".")[0]
            if name:
                deps.add(name)
    return deps


def is_script(path):
    return re.search(r'^if __name__ == "__main__":', open(path, encoding="utf-8").read(), re.M) is not None


def test_libraries_never_import_scripts_and_there_are_no_cycles():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    scripts = {m for m, p in known.items() if is_script(p)}
    assert {"train", "sample", "prepare_data", "evaluate"} <= scripts
    bad = [f"{m} imports the script {d}" for m, ds in graph.items() for d in ds
           if d in scripts and not d.startswith(m.split(".")[0] + ".")]
    assert not bad, bad

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for d in graph[node]:
                if d == start:
                    return path + [d]
                if d not in seen:
                    seen.add(d)
                    stack.append((d, path + [d]))
        return None
    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, cycles


def test_the_product_cites_only_what_ships_with_it():
    # the spec documents behind the issues are not in the repository: a user has none of them
    pattern = re.compile(r"LIMA\.md|PERF\.md|STYLE\.md|DESIGN\.md|\.\./shared")
    offenders = []
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
        for n in names:
            if n.endswith((".py", ".md", ".txt")) and n != os.path.basename(__file__):
                path = os.path.join(d, n)
                for i, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
                    if pattern.search(line):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()[:80]}")
    assert not offenders, offenders


def test_docs_named_in_the_code_exist():
    # every docs/*.md and benchmarks/*.md a source file or the README points to is there
    cited = set()
    for path in [os.path.join(ROOT, "README.md")] + list(modules().values()):
        cited |= set(re.findall(r"\b((?:docs|benchmarks)/[\w./-]+\.md)\b", open(path, encoding="utf-8").read()))
    missing = sorted(c for c in cited if not os.path.isfile(os.path.join(ROOT, c)))
    assert cited and not missing, missing
