#!/usr/bin/env python
"""Draws the import graph of the twhin_jax package (docs/architecture.md).

Every module is a box; an arrow a -> b means a imports b (module level or
inside a function: both are dependencies). Boxes stand in layers by their
depth in the graph: a module sits one layer above the deepest module it
imports, so the foundations are at the bottom and the entry points (cli) at
the top. Modules of an import cycle share a layer and are drawn in red.

  python tools/module_graph.py --out docs/architecture/modules_after.png
  python tools/module_graph.py --rev 744caab --out docs/architecture/modules_before.png
  python tools/module_graph.py --function-imports

``--rev`` reads the package as it was at a git revision (``git show``).
``--function-imports`` lists the imports made inside a function and marks
those without a comment on their line or the line above (the package's rule:
an import stays inside a function only for an optional or heavy dependency
that the module must not load at import time, and says so there); it exits 1
when one lacks its comment.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import os
import subprocess
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "twhin_jax"


def package_sources(rev: str | None) -> dict[str, str]:
  """module name -> source text, from the working tree or a git revision."""
  if rev is None:
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          with open(path, encoding="utf-8") as f:
            out[module_name(os.path.relpath(path, ROOT))] = f.read()
    return out
  listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, PACKAGE], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
  return {module_name(path): subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT,
                                            capture_output=True, text=True, check=True).stdout
          for path in listing if path.endswith(".py")}


def module_name(path: str) -> str:
  parts = path[:-3].split(os.sep if os.sep in path else "/")
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def imports(sources: dict[str, str]) -> dict[str, set[str]]:
  """module -> the package modules it imports (anywhere in the file)."""
  graph = {m: set() for m in sources}
  for module, text in sources.items():
    for node in ast.walk(ast.parse(text)):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      for name in names:
        while name and name not in sources:
          name = name.rpartition(".")[0]
        if name and name != module and name != PACKAGE:
          graph[module].add(name)
  return graph


@dataclasses.dataclass(frozen=True)
class FunctionImport:
  module: str
  line: int
  text: str  # the import statement's first line
  commented: bool  # a comment on its line or on the line above


def function_level_imports(sources: dict[str, str]) -> list[FunctionImport]:
  """Every import statement inside a function (at any depth), in module and
  line order; ``commented`` when a comment stands on its first line or on the
  line above it (a trailing comment there counts: two imports of one package
  may share one)."""
  out = []
  for module, text in sorted(sources.items()):
    lines = text.splitlines()
    comment_lines = {token.start[0] for token in
                     tokenize.generate_tokens(io.StringIO(text).readline)
                     if token.type == tokenize.COMMENT}
    found = set()
    for function in ast.walk(ast.parse(text)):
      if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(function):
          if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.add(node.lineno)
    for line in sorted(found):
      out.append(FunctionImport(module, line, lines[line - 1].strip(),
                                bool({line, line - 1} & comment_lines)))
  return out


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's components (iterative enough for a package of ~50 modules)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      out.append(component)

  sys.setrecursionlimit(10_000)
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def layers(graph: dict[str, set[str]]) -> tuple[dict[str, int], set[str]]:
  """module -> layer (0: imports nothing of the package), and the cyclic modules."""
  components = strongly_connected(graph)
  owner = {m: i for i, c in enumerate(components) for m in c}
  cyclic = {m for c in components if len(c) > 1 for m in c}
  depth: dict[int, int] = {}

  def component_depth(i):
    if i not in depth:
      depth[i] = 0
      below = {owner[w] for m in components[i] for w in graph[m]} - {i}
      depth[i] = 1 + max((component_depth(j) for j in below), default=-1)
    return depth[i]

  return {m: component_depth(owner[m]) for m in graph}, cyclic


def draw(graph, out: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  layer_of, cyclic = layers(graph)
  rows: dict[int, list[str]] = {}
  for m in sorted(graph, key=lambda m: (layer_of[m], m)):
    rows.setdefault(layer_of[m], []).append(m)
  width = max(len(r) for r in rows.values())
  position = {}
  for level, members in rows.items():
    for k, m in enumerate(members):
      position[m] = ((k + 0.5) * width / len(members), level)
  fig, ax = plt.subplots(figsize=(max(12, width * 1.6), 1.6 * (len(rows) + 1)))
  for a, targets in graph.items():
    for b in targets:
      (x0, y0), (x1, y1) = position[a], position[b]
      color = "tab:red" if a in cyclic and b in cyclic else "0.75"
      ax.annotate("", xy=(x1, y1 + 0.12), xytext=(x0, y0 - 0.12),
                  arrowprops=dict(arrowstyle="->", color=color, lw=0.6, alpha=0.7))
  for m, (x, y) in position.items():
    ax.text(x, y, m.replace(f"{PACKAGE}.", ""), ha="center", va="center", fontsize=7,
            bbox=dict(boxstyle="round", fc="mistyrose" if m in cyclic else "white",
                      ec="tab:red" if m in cyclic else "0.4"))
  ax.set_xlim(-0.5, width + 0.5)
  ax.set_ylim(-0.8, len(rows) - 0.2)
  ax.axis("off")
  cycles = len({frozenset(c) for c in strongly_connected(graph) if len(c) > 1})
  ax.set_title(f"{title}: {len(graph)} modules, "
               f"{sum(len(t) for t in graph.values())} imports, {cycles} import cycles "
               "(arrows point at what a module imports)")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110, bbox_inches="tight")
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rev", default=None, help="git revision (default: the working tree)")
  parser.add_argument("--out", default=None, help="PNG path")
  parser.add_argument("--function-imports", action="store_true",
                      help="list function-level imports; exit 1 if one has no comment")
  args = parser.parse_args(argv)
  sources = package_sources(args.rev)
  if args.function_imports:
    found = function_level_imports(sources)
    missing = [f for f in found if not f.commented]
    for f in missing:
      print(f"{f.module}:{f.line}: no comment: {f.text}")
    print(f"{len(found)} function-level imports in {PACKAGE}, "
          f"{len(found) - len(missing)} with a comment, {len(missing)} without")
    return 1 if missing else 0
  if not args.out:
    parser.error("--out PNG is required (or --function-imports)")
  graph = imports(sources)
  draw(graph, args.out, f"twhin_jax at {args.rev or 'the working tree'}")
  layer_of, cyclic = layers(graph)
  print(f"{len(graph)} modules, {len(layer_of and set(layer_of.values()))} layers, "
        f"cyclic modules: {sorted(cyclic) or 'none'} -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
