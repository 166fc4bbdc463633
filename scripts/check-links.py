#!/usr/bin/env python3
"""Checks that every relative link in README.md and docs/*.md resolves inside the repository.

A link `[text](path)`, `![alt](path)` or `[label]: path` whose target is not a URL (no
`scheme:`, no `//`) must name a file or folder that exists, relative to the file that holds
it, without leaving the repository. A `#fragment` (alone: the same file) that points into a
Markdown file must match one of its headings as GitHub slugs them, or an explicit
`<a name|id="...">`. Links inside code (fenced blocks, `inline code`) are not links.

Usage: scripts/check-links.py [FILE.md ...]   (default: README.md docs/*.md)
Before the real check it runs itself on a small made-up tree with known good and broken links
(so a green run means the checker can fail). Exit 1 with one line per broken link,
`file:line: target: why`; the last line is `links: N relative links in M files resolve` on
success.
"""

import os
import re
import sys
import tempfile
import unicodedata
import urllib.parse

ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
# [text](target "title") and ![alt](target); the text may hold `code` and nested [..].
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
ANCHOR = re.compile(r"<a\s+[^>]*(?:name|id)\s*=\s*\"([^\"]+)\"", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def strip_code_spans(line):
    """The line with inline code replaced by spaces (same columns, no links inside)."""
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def lines_outside_fences(text):
    """(line number, line) for every line that is not inside a fenced code block."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                continue
            yield number, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
            fence = None


def heading_text(raw):
    """A heading as rendered text: links become their text, code keeps its content."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", raw)
    text = re.sub(r"<[^>]+>", "", text)
    text = CODE_SPAN.sub(lambda m: m.group(2), text)
    # Emphasis markers do not survive rendering; `_` inside words does.
    text = re.sub(r"(\*+)(\S.*?)\1", r"\2", text)
    return text


def slug(text):
    """GitHub's heading id: lower case, punctuation dropped (not - or _), spaces to -."""
    out = []
    for ch in text.strip().lower():
        cat = unicodedata.category(ch)
        if ch in "-_" or cat[0] in "LMN":
            out.append(ch)
        elif ch == " ":
            out.append("-")
    return "".join(out)


def anchors(path, cache={}):
    """Every fragment a Markdown file answers to."""
    if path not in cache:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        found, seen = set(), {}
        for _, line in lines_outside_fences(text):
            m = HEADING.match(line)
            if m:
                base = slug(heading_text(m.group(2)))
                n = seen.get(base, 0)
                seen[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
            found.update(ANCHOR.findall(line))
        cache[path] = found
    return cache[path]


def links(path):
    """(line number, target) of every link in a Markdown file, code excluded."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for number, line in lines_outside_fences(text):
        plain = strip_code_spans(line)
        m = REFERENCE.match(plain)
        if m:
            yield number, m.group(1)
            continue
        for m in INLINE.finditer(plain):
            yield number, m.group(1)


def check(root, files):
    """(problems, relative links checked)."""
    problems, count = [], 0
    for file in files:
        full = os.path.join(root, file)
        for number, target in links(full):
            target = target.strip("<>")
            if SCHEME.match(target) or target.startswith("//"):
                continue
            count += 1
            path_part, _, fragment = target.partition("#")
            path_part = urllib.parse.unquote(path_part)
            if path_part:
                resolved = os.path.realpath(os.path.join(os.path.dirname(full), path_part))
            else:
                resolved = os.path.realpath(full)
            where = f"{file}:{number}: {target}"
            if os.path.commonpath([resolved, root]) != root:
                problems.append(f"{where}: points outside the repository")
                continue
            if not os.path.exists(resolved):
                problems.append(f"{where}: {os.path.relpath(resolved, root)} does not exist")
                continue
            if fragment and resolved.endswith(".md") and os.path.isfile(resolved):
                fragment = urllib.parse.unquote(fragment)
                if fragment not in anchors(resolved):
                    problems.append(
                        f"{where}: no heading with the id \"{fragment}\" in "
                        f"{os.path.relpath(resolved, root)}"
                    )
    return problems, count


def self_test():
    """The checker finds exactly the broken links of a made-up tree, and none of the good."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.realpath(os.path.join(tmp, "repo"))
        os.makedirs(os.path.join(root, "docs"))
        files = {
            "README.md": "# Top\n\nSee [a](docs/a.md#the-setup-just-test), [dir](docs/),\n"
            "[same](#top), [web](https://example.com/x.md), [mail](mailto:x@y.z),\n"
            "[gone](docs/missing.md), [bad](docs/a.md#nowhere), [out](../outside.md)\n"
            "`[code](docs/nope.md)` and\n```\n[fenced](docs/nope.md)\n```\n"
            "[ref]: docs/a.md#q--a\n",
            "docs/a.md": "# A\n## The setup (`just test`)\n## Q & A\n## Q & A\n"
            "[dup](#q--a-1) [raw](a.md#missing) [up](../README.md#top)\n",
        }
        for name, text in files.items():
            with open(os.path.join(root, name), "w", encoding="utf-8") as f:
                f.write(text)
        problems, count = check(root, list(files))
        want = [
            "README.md:5: docs/missing.md: docs/missing.md does not exist",
            'README.md:5: docs/a.md#nowhere: no heading with the id "nowhere" in docs/a.md',
            "README.md:5: ../outside.md: points outside the repository",
            'docs/a.md:5: a.md#missing: no heading with the id "missing" in docs/a.md',
        ]
        if problems != want or count != 10:
            sys.exit(
                "check-links: the self-test failed, the checker is broken:\n  got "
                + "\n      ".join(problems)
                + f"\n  ({count} links)\n  want "
                + "\n       ".join(want)
            )


def main():
    self_test()
    files = sys.argv[1:]
    if not files:
        docs = sorted(f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
        files = ["README.md"] + [f"docs/{f}" for f in docs]
    problems, count = check(ROOT, files)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"links: {len(problems)} of {count} relative links are broken", file=sys.stderr)
        sys.exit(1)
    print(f"links: {count} relative links in {len(files)} files resolve")


if __name__ == "__main__":
    main()
