#!/usr/bin/env python3
"""The module rules of the `sluice` crate (shared/src), which `just lint` enforces:

(a) no import cycle between the crate's top-level modules (shared/src/<name>.rs or <name>/):
    a module that needs another must not be needed by it, directly or through others;
(b) no import cycle between the sibling files of one folder (each child file, or child folder
    taken as a whole); the folder's mod.rs (or <folder>.rs) is its table of contents, free to
    name its children, and left out of (b);
(c) no file over 800 lines.

A dependency is a path in a `use` statement or an expression that starts with `crate::`,
`$crate::` or `super::` and leads into another module; names the crate root or a folder's
mod.rs re-exports (`pub use`) are followed to the module that defines them. Comments and
string literals are not read. Each cycle is printed as `a -> b -> a`, with one example line
per edge; the exit status is 1 if any rule is broken.

    scripts/check-modules.py [--root shared/src] [--max-lines 800]
    scripts/check-modules.py --self-test   # finds a cycle in a tiny synthetic tree, none in an acyclic one
"""

import argparse
import os
import re
import sys
import tempfile
from collections import defaultdict, deque

MAX_LINES = 800

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


# --- reading Rust source ----------------------------------------------------------------------


def strip(text):
    """The source with comments, string and char literals blanked out (newlines kept, so line
    numbers and columns stay as they were)."""
    out = []
    i, n = 0, len(text)

    def blank(s):
        return re.sub(r"[^\n]", " ", s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        else:
            raw = re.match(r'b?r(#*)"', text[i:]) if c in "br" else None
            if raw and (i == 0 or not re.match(r"[A-Za-z0-9_]", text[i - 1])):
                end = '"' + raw.group(1)
                j = text.find(end, i + raw.end())
                j = n if j < 0 else j + len(end)
                out.append(blank(text[i:j]))
                i = j
            elif c == '"' or (c == "b" and text.startswith('b"', i)):
                j = i + (2 if c == "b" else 1)
                while j < n and text[j] != '"':
                    j += 2 if text[j] == "\\" else 1
                out.append(blank(text[i : j + 1]))
                i = j + 1
            elif c == "'":
                m = re.match(r"'(\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'\n])'", text[i:])
                if m:
                    out.append(blank(m.group(0)))
                    i += m.end()
                else:  # a lifetime
                    out.append(c)
                    i += 1
            else:
                out.append(c)
                i += 1
    return "".join(out)


def module_of(src, path):
    """The module path of a file under `src`: lib.rs -> [], a.rs -> [a], a/mod.rs -> [a],
    a/b.rs -> [a, b]."""
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel == ["lib"] or rel == ["main"]:
        return []
    if rel[-1] == "mod":
        rel = rel[:-1]
    return rel


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


class Source:
    """One file: its module, its lines, and where inline `mod x { ... }` blocks are."""

    def __init__(self, src, path):
        self.path = path
        self.text = open(path, encoding="utf-8").read()
        self.code = strip(self.text)
        self.lines = self.text.split("\n")
        self.module = module_of(src, path)
        self.toc = os.path.basename(path) in ("mod.rs", "lib.rs", "main.rs") or os.path.isdir(
            path[: -len(".rs")]
        )
        # (start, end, [inline module names]) spans, innermost last.
        self.inline = []
        for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", self.code):
            depth, j = 1, m.end()
            while j < len(self.code) and depth:
                depth += {"{": 1, "}": -1}.get(self.code[j], 0)
                j += 1
            self.inline.append((m.start(), j, m.group(1)))

    def module_at(self, pos):
        """The module path at a position (the file's module plus the inline modules around it)."""
        return self.module + [name for start, end, name in self.inline if start <= pos < end]

    def inline_modules(self):
        return [self.module_at(start + 1) for start, _, _ in self.inline]

    def example(self, pos):
        line = line_of(self.code, pos)
        return line, self.lines[line - 1].strip()


def use_paths(code):
    """Every `use` statement: (its position, [(leaf path segments, alias, position of the
    leaf)]), groups expanded (`use a::{b, c::d}` -> a::b, a::c::d)."""
    for m in re.finditer(r"\buse\s+", code):
        end = code.find(";", m.end())
        if end < 0:
            continue
        tokens = [
            (t.group(0), m.end() + t.start())
            for t in re.finditer(r"\$?" + IDENT + r"|::|[{},*]", code[m.end() : end])
        ]
        leaves = []

        def tree(i, prefix):
            # path segments, then optionally `::{...}`, `::*` or `as alias`
            segs = list(prefix)
            last_pos = tokens[i][1] if i < len(tokens) else m.end()
            while i < len(tokens):
                tok, pos = tokens[i]
                if tok == "{":
                    i += 1
                    while i < len(tokens) and tokens[i][0] != "}":
                        i = tree(i, segs)
                        if i < len(tokens) and tokens[i][0] == ",":
                            i += 1
                    return i + 1
                if tok == "*":
                    leaves.append((segs + ["*"], None, pos))
                    return i + 1
                if tok in (",", "}"):
                    break
                if tok == "::":
                    i += 1
                    continue
                if tok == "as" and i + 1 < len(tokens):
                    leaves.append((segs, tokens[i + 1][0], last_pos))
                    return i + 2
                segs.append(tok)
                last_pos = pos
                i += 1
            if segs != list(prefix):
                leaves.append((segs, None, last_pos))
            return i

        i = 0
        while i < len(tokens):
            i = tree(i, [])
            while i < len(tokens) and tokens[i][0] == ",":
                i += 1
        yield m.start(), m.group(0), leaves


def is_pub_use(code, pos):
    """Whether the `use` at `pos` is a re-export (`pub use`, `pub(crate) use`, ...)."""
    before = code[max(0, pos - 40) : pos]
    return re.search(r"\bpub(\s*\([^)]*\))?\s*$", before) is not None


EXPR_PATH = re.compile(r"(?<![A-Za-z0-9_])(\$?crate|super)((?:\s*::\s*" + IDENT + r")+)")


# --- resolving paths to modules ---------------------------------------------------------------


class Crate:
    def __init__(self, src):
        self.src = src
        self.files = []
        for root, dirs, names in os.walk(src):
            dirs.sort()
            for name in sorted(names):
                if name.endswith(".rs"):
                    self.files.append(Source(src, os.path.join(root, name)))
        self.modules = set()
        for f in self.files:
            self.modules.add(tuple(f.module))
            for m in f.inline_modules():
                self.modules.add(tuple(m))
        # module -> {name: absolute path it re-exports}
        self.reexports = defaultdict(dict)
        for f in self.files:
            for pos, _, leaves in use_paths(f.code):
                if not is_pub_use(f.code, pos) or f.module_at(pos) != f.module:
                    continue
                for segs, alias, _ in leaves:
                    if segs[-1] == "*":
                        continue
                    target = self.absolute(f.module, segs, relative_children=True)
                    if target is not None:
                        self.reexports[tuple(f.module)][alias or segs[-1]] = target

    def absolute(self, here, segs, relative_children=False):
        """The absolute path of `segs` written in module `here`; None if it leaves the crate."""
        segs = list(segs)
        if segs[0] in ("crate", "$crate"):
            return segs[1:]
        if segs[0] == "super":
            base = list(here)
            while segs and segs[0] == "super":
                if not base:
                    return None
                base.pop()
                segs.pop(0)
            return base + segs
        if segs[0] == "self":
            return list(here) + segs[1:]
        if relative_children and tuple(list(here) + segs[:1]) in self.modules:
            return list(here) + segs
        return None

    def module_for(self, path, depth=0):
        """The module an absolute path leads into: its longest prefix that is a module, or,
        where the next name is a re-export of that module, the module it comes from."""
        path = [s for s in path if s != "*"]
        k = len(path)
        while k > 0 and tuple(path[:k]) not in self.modules:
            k -= 1
        module = path[:k]
        if k < len(path) and depth < 8:
            target = self.reexports.get(tuple(module), {}).get(path[k])
            if target is not None:
                return self.module_for(target + path[k + 1 :], depth + 1)
        return module

    def references(self):
        """Every dependency: (file, position, source module, target module)."""
        for f in self.files:
            in_use = []
            for pos, head, leaves in use_paths(f.code):
                end = f.code.find(";", pos)
                in_use.append((pos, end))
                here = f.module_at(pos)
                for segs, _, leaf_pos in leaves:
                    if segs[0] not in ("crate", "$crate", "super"):
                        continue
                    target = self.absolute(here, segs)
                    if target is not None:
                        yield f, leaf_pos, here, self.module_for(target)
            for m in EXPR_PATH.finditer(f.code):
                if any(start <= m.start() < end for start, end in in_use):
                    continue
                if re.search(r"\bin\s*$", f.code[max(0, m.start() - 10) : m.start()]):
                    continue  # pub(in crate::x): a visibility, not a dependency
                segs = [m.group(1)] + re.findall(IDENT, m.group(2))
                here = f.module_at(m.start())
                target = self.absolute(here, segs)
                if target is not None:
                    yield f, m.start(), here, self.module_for(target)


# --- the rules ----------------------------------------------------------------------------------


def graphs(crate):
    """The dependency graphs: {scope: {(a, b): (file, line, text)}}; scope "" is the crate's
    top level (rule a), a folder's module path its sibling graph (rule b)."""
    edges = defaultdict(dict)
    folders = {tuple(f.module) for f in crate.files if f.toc and f.module}
    for f, pos, here, target in crate.references():
        line, text = f.example(pos)
        where = (os.path.relpath(f.path), line, text)
        # (a) the top-level modules (lib.rs, the crate root, is the table of contents)
        if here and target and here[0] != target[0]:
            edges[""].setdefault((here[0], target[0]), where)
        # (b) the children of each folder that contains both ends
        for depth in range(1, len(here)):
            folder = tuple(here[:depth])
            if folder not in folders:
                continue
            if f.toc and tuple(f.module) == folder:
                continue  # the folder's own table of contents
            if len(target) > depth and tuple(target[:depth]) == folder:
                a, b = here[depth], target[depth]
                if a != b:
                    edges["::".join(folder)].setdefault((a, b), where)
    return edges


def cycles(edges):
    """Cycles through every edge that is on one: for each edge (u, v) of a strongly connected
    component, u -> v and the shortest way back; each cycle once."""
    succ = defaultdict(set)
    for a, b in edges:
        succ[a].add(b)
    found, seen = [], set()
    for u, v in sorted(edges):
        # shortest path v -> u
        prev, queue = {v: None}, deque([v])
        while queue and u not in prev:
            x = queue.popleft()
            for y in sorted(succ[x]):
                if y not in prev:
                    prev[y] = x
                    queue.append(y)
        if u not in prev:
            continue
        back, x = [], u
        while x is not None:
            back.append(x)
            x = prev[x]
        cycle = [u] + back[::-1]  # u -> v -> ... -> u
        nodes = cycle[:-1]
        i = nodes.index(min(nodes))
        key = tuple(nodes[i:] + nodes[:i])
        if key not in seen:
            seen.add(key)
            found.append(list(key) + [key[0]])
    return found


def check(src, max_lines=MAX_LINES, out=sys.stdout):
    """Checks the crate under `src`; prints what is wrong; returns (cycles, long files)."""
    crate = Crate(src)
    all_cycles = []
    for scope, edges in sorted(graphs(crate).items()):
        for cycle in cycles(edges):
            all_cycles.append((scope, cycle))
            prefix = scope + "::" if scope else ""
            what = "top-level modules" if not scope else "files of " + scope.replace("::", "/") + "/"
            print(
                "import cycle (%s): %s" % (what, " -> ".join(prefix + c for c in cycle)),
                file=out,
            )
            for a, b in zip(cycle, cycle[1:]):
                path, line, text = edges[(a, b)]
                print("  %s -> %s: %s:%d: %s" % (a, b, path, line, text), file=out)
    long_files = []
    for f in crate.files:
        n = len(f.text.splitlines())
        if n > max_lines:
            long_files.append((f.path, n))
            print(
                "too long: %s: %d lines (at most %d)"
                % (os.path.relpath(f.path), n, max_lines),
                file=out,
            )
    return all_cycles, long_files


# --- self-test ----------------------------------------------------------------------------------


def write_tree(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


CYCLIC = {
    "lib.rs": "pub mod a;\npub mod b;\npub mod c;\npub mod d;\npub mod f;\npub use a::Thing;\n",
    # a <-> b through a use statement and an expression path
    "a.rs": "use crate::b::B;\npub struct Thing;\npub fn a() { let _ = B; crate::d::d(); }\n",
    "b.rs": "pub struct B;\npub fn b() { crate::a::a() }\n",
    # c only names a in a comment and a string: no edge, so no cycle through c
    "c.rs": '// crate::a::a\npub fn c() -> &\'static str { "crate::a::a" }\n',
    # a -> d, and d -> a only through the crate root's re-export of a::Thing
    "d.rs": "use crate::{c, Thing};\npub fn d() { let _ = Thing; c::c(); }\n",
    # f/x <-> f/y through super::, inside a folder
    "f/mod.rs": "mod sub;\nmod x;\nmod y;\npub use x::X;\n",
    "f/x.rs": "use super::y::Y;\npub struct X;\nfn x() { let _ = super::sub::m::M; }\n",
    "f/y.rs": "pub struct Y;\nfn y() { let _ = super::x::X; }\n",
    # a child folder of f is one sibling: f/sub <-> f/x, from a file two levels down
    "f/sub/mod.rs": "pub mod m;\n",
    "f/sub/m.rs": "pub struct M;\nfn m() { let _ = crate::f::X; }\n",
    "long.rs": "// filler\n" * (MAX_LINES + 1),
}

ACYCLIC = {
    "lib.rs": "pub mod a;\npub mod b;\npub mod f;\npub mod g;\npub use b::B;\n",
    "a.rs": "use crate::{b::B, f::X};\npub fn a() { let _ = (B, X); }\n",
    # a test module's `use super::*` is the file's own module; the doc names a in a comment
    "b.rs": "/// Not crate::a::a.\npub struct B;\n#[cfg(test)]\nmod tests {\n    use super::*;\n    fn t() { let _ = B; }\n}\n",
    # the table of contents names both children; y uses what mod.rs itself defines
    "f/mod.rs": "mod x;\nmod y;\npub use x::X;\npub use y::Y;\npub struct Z;\n",
    "f/x.rs": "use super::y::Y;\npub struct X;\nfn x() { let _ = Y; }\n",
    "f/y.rs": "use super::Z;\npub struct Y;\nfn y() { let _ = (Z, crate::b::B); }\n",
    # g.rs is g/'s table of contents (the file beside the folder)
    "g.rs": "mod p;\nmod q;\npub use p::P;\npub use q::Q;\n",
    "g/p.rs": "use super::q::Q;\npub struct P;\nfn p() { let _ = Q; }\n",
    "g/q.rs": "pub struct Q;\n",
}


def self_test():
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        cyclic, acyclic = os.path.join(tmp, "cyclic", "src"), os.path.join(tmp, "acyclic", "src")
        write_tree(cyclic, CYCLIC)
        write_tree(acyclic, ACYCLIC)

        report = open(os.devnull, "w")
        found, long_files = check(cyclic, out=report)
        got = {(scope, tuple(c)) for scope, c in found}
        for want in [
            ("", ("a", "b", "a")),
            ("", ("a", "d", "a")),
            ("f", ("x", "y", "x")),
            ("f", ("sub", "x", "sub")),
        ]:
            if want not in got:
                failures.append("cyclic tree: %s not found (found %s)" % (want, sorted(got)))
        if any("c" in c for _, c in got):
            failures.append("cyclic tree: a cycle through c, which names a only in a comment and a string: %s" % sorted(got))
        if [os.path.basename(p) for p, _ in long_files] != ["long.rs"]:
            failures.append("cyclic tree: long files %s, expected long.rs" % long_files)

        found, long_files = check(acyclic, out=report)
        if found or long_files:
            failures.append("acyclic tree: found %s and long files %s" % (found, long_files))
    if failures:
        for f in failures:
            print("check-modules self-test FAILED: " + f)
        return 1
    print("check-modules self-test: ok (cycles found in the cyclic tree, none in the acyclic one)")
    return 0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.join(here, "..", "shared", "src"))
    parser.add_argument("--max-lines", type=int, default=MAX_LINES)
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    src = os.path.normpath(args.root)
    found, long_files = check(src, args.max_lines)
    if found or long_files:
        print(
            "modules: %d import cycle(s), %d file(s) over %d lines in %s"
            % (len(found), len(long_files), args.max_lines, src)
        )
        return 1
    print("modules: no import cycle, no file over %d lines in %s" % (args.max_lines, src))
    return 0


if __name__ == "__main__":
    sys.exit(main())
