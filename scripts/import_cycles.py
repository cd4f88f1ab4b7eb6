#!/usr/bin/env python3
"""Import cycles between the files of each crate of a Rust workspace (python3, stdlib only).

    python3 scripts/import_cycles.py [ROOT]     # ROOT: the workspace folder, default `.`

Every folder under ROOT with a `Cargo.toml` and a `src/` is a crate. Its targets (`src/lib.rs`,
`src/main.rs`, `src/bin/*`, and the `path` of `[lib]`/`[[bin]]`) are followed through their
`mod name;` declarations to the files that make each module, so a file no target compiles is
not read. A file imports another when it names a path into it: `crate::a::b` (in a `use` or
anywhere in the code), `super::x`, `self::x`, and each leaf of a `use crate::{a, b::c}` group.
A path resolves to the deepest module file it names; an item of a module root (`super::Item`
from a child) is an import of that root. Test modules (`#[cfg(test)] mod ... { }`), comments
and string literals are not read.

A cycle is a set of files that all reach each other (a strongly connected component of more
than one file). The one allowed exception is an actor and its child that must know each other:
an import whose line, or the line above it, carries `// cycle-ok: <why>` does not count. The
reason is required; a bare `// cycle-ok:` is refused.

Prints `cycles N`, then each cycle as its files joined by ` <-> ` and, indented below, the
imports that close it (`file:line -> file`); then the imports allowed by `cycle-ok`. Exits 1
when there is a cycle (or a `cycle-ok` without a reason), 0 otherwise.
"""

import os
import re
import sys

SKIP_DIRS = {"target", ".git", "node_modules"}
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
PATH_RE = re.compile(r"(?<![\w$:])(crate|super|self)((?:\s*::\s*(?:" + IDENT + r"))+)")
USE_RE = re.compile(r"(?<![\w$])use\s+([^;]*);", re.S)
MOD_DECL_RE = re.compile(r"((?:#\s*\[[^\]]*\]\s*)*)(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*([;{])")
CYCLE_OK_RE = re.compile(r"//\s*cycle-ok:(.*)")


def mask(text):
    """The text with comments and the insides of string and char literals blanked (newlines
    kept, so offsets and line numbers stay), and the line comments by line number."""
    out = list(text)
    comments = {}
    i, n = 0, len(text)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            comments[text.count("\n", 0, i) + 1] = text[i:j]
            blank(i, j)
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
            blank(i, j)
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(text, i)) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = '"' + m.group(1)
            j = text.find(end, m.end())
            j = n if j < 0 else j + len(end)
            blank(m.end(), j - len(end))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(i + 1, j)
            i = j + 1
        elif c == "'" and (m := re.compile(r"'(?:\\.[^']*|[^\\'\n])'").match(text, i)):
            blank(i + 1, m.end() - 1)
            i = m.end()
        else:
            i += 1
    return "".join(out), comments


def block_end(text, brace):
    """The offset just past the `}` that closes the `{` at `brace`."""
    depth = 0
    for k in range(brace, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return k + 1
    return len(text)


def without_test_modules(masked):
    """`#[cfg(test)] mod x { ... }` blanked: test code imports what it tests, both ways."""
    out = masked
    for m in reversed(list(MOD_DECL_RE.finditer(masked))):
        if m.group(3) == "{" and re.search(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]", m.group(1)):
            end = block_end(masked, m.end() - 1)
            out = out[: m.start()] + re.sub(r"[^\n]", " ", out[m.start() : end]) + out[end:]
    return out


def child_files(path, is_mod_root, masked):
    """The files of the `mod name;` declarations of one file (test-only ones left out)."""
    base = os.path.dirname(path) if is_mod_root else os.path.splitext(path)[0]
    children = []
    for m in MOD_DECL_RE.finditer(masked):
        attrs, name, end = m.groups()
        if end != ";" or re.search(r"cfg\s*\(\s*test\s*\)", attrs):
            continue
        explicit = re.search(r'path\s*=\s*"([^"]*)"', attrs)
        if explicit:
            candidates = [os.path.join(os.path.dirname(path), explicit.group(1))]
        else:
            candidates = [os.path.join(base, name + ".rs"), os.path.join(base, name, "mod.rs")]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found:
            children.append((name, found))
    return children


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def module_tree(root_file):
    """Module path (a tuple, `()` for the target's root) -> file, following `mod` declarations."""
    mods = {(): root_file}
    todo = [((), root_file, True)]
    while todo:
        mod, path, is_mod_root = todo.pop()
        raw = read(path)
        masked = without_test_modules(mask(raw)[0])
        for name, child in child_files(path, is_mod_root, merge_attrs(masked, raw)):
            if mod + (name,) not in mods:
                mods[mod + (name,)] = child
                todo.append((mod + (name,), child, os.path.basename(child) == "mod.rs"))
    return mods


def merge_attrs(masked, raw):
    """The masked text with the `#[...]` attributes restored from the raw text (a `#[path]`
    holds a string literal that masking blanked)."""
    out = list(masked)
    for m in re.finditer(r"#\s*\[[^\]\n]*\]", raw):
        if masked[m.start()] == "#":
            out[m.start() : m.end()] = raw[m.start() : m.end()]
    return "".join(out)


def use_paths(tree):
    """The leaves of a use tree as lists of segments: `a::{b, c::{d, self}}` -> a::b, a::c::d, a::c."""
    tree = re.sub(r"\s+as\s+" + IDENT, "", tree)
    tree = re.sub(r"\s+", "", tree)

    def split_top(s):
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            depth += ch == "{"
            depth -= ch == "}"
            cur += ch
        parts.append(cur)
        return [p for p in parts if p]

    def walk(prefix, s):
        brace = s.find("{")
        if brace < 0:
            segs = [x for x in s.split("::") if x]
            if segs and segs[-1] == "self":
                segs = segs[:-1]
            if segs and segs[-1] == "*":
                segs = segs[:-1]
            return [prefix + segs]
        head = [x for x in s[:brace].split("::") if x]
        inner = s[brace + 1 : s.rfind("}")]
        leaves = []
        for part in split_top(inner):
            leaves += walk(prefix + head, part)
        return leaves

    return walk([], tree)


def resolve(segs, cur, mods):
    """The module file a path starting `crate`/`super`/`self` lands in, from module `cur` (which
    may be an inline `mod x { }` inside a file: it is not in `mods`, its file is)."""
    if not segs or segs[0] not in ("crate", "super", "self"):
        return None
    if segs[0] == "crate":
        full = tuple(segs[1:])
    else:
        base, rest = cur, list(segs)
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                if not base:
                    return None
                base = base[:-1]
            rest = rest[1:]
        full = base + tuple(rest)
    for k in range(len(full), -1, -1):
        if full[:k] in mods:
            return full[:k]
    return None


def inline_modules(masked):
    """(start, end, name) of each `mod name { ... }` written inside a file."""
    return [(m.start(), block_end(masked, m.end() - 1), m.group(2)) for m in MOD_DECL_RE.finditer(masked) if m.group(3) == "{"]


def imports(mod, path, mods):
    """(target module, line, allowed, reason-missing) for each path this file names into its crate."""
    text = read(path)
    masked, comments = mask(text)
    masked = without_test_modules(masked)
    line_of = lambda off: masked.count("\n", 0, off) + 1
    inline = inline_modules(masked)
    # The module a path is written in: the file's, or an inline module inside it.
    scope = lambda off: mod + tuple(name for start, end, name in inline if start < off < end)

    def allowed(first, last):
        notes = [comments.get(k) for k in range(first - 1, last + 1)]
        oks = [CYCLE_OK_RE.search(n) for n in notes if n]
        oks = [m for m in oks if m]
        if not oks:
            return False, False
        return any(m.group(1).strip() for m in oks), not any(m.group(1).strip() for m in oks)

    found = []
    spans = []
    for m in USE_RE.finditer(masked):
        if re.search(r"\bin\s*$", masked[max(0, m.start() - 8) : m.start()]):
            continue
        first, last = line_of(m.start()), line_of(m.end())
        ok, bare = allowed(first, last)
        for segs in use_paths(m.group(1)):
            target = resolve(segs, scope(m.start()), mods)
            if target is not None and target != mod:
                found.append((target, first, ok, bare))
        spans.append((m.start(), m.end()))
    rest = list(masked)
    for a, b in spans:
        rest[a:b] = re.sub(r"[^\n]", " ", masked[a:b])
    rest = "".join(rest)
    for m in PATH_RE.finditer(rest):
        if re.search(r"\bin\s+$", rest[max(0, m.start() - 8) : m.start()]):
            continue  # `pub(in crate::x)` is a visibility, not an import
        segs = [m.group(1)] + [s for s in re.split(r"\s*::\s*", m.group(2)) if s]
        target = resolve(segs, scope(m.start()), mods)
        if target is not None and target != mod:
            line = line_of(m.start())
            ok, bare = allowed(line, line)
            found.append((target, line, ok, bare))
    return found


def sccs(graph):
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def crate_targets(crate_dir):
    src = os.path.join(crate_dir, "src")
    roots = [os.path.join(src, f) for f in ("lib.rs", "main.rs")]
    bin_dir = os.path.join(src, "bin")
    if os.path.isdir(bin_dir):
        for f in sorted(os.listdir(bin_dir)):
            p = os.path.join(bin_dir, f)
            roots.append(p if f.endswith(".rs") else os.path.join(p, "main.rs"))
    manifest = read(os.path.join(crate_dir, "Cargo.toml"))
    for section in re.finditer(r"^\[\[?(lib|bin)\]\]?\s*$(.*?)(?=^\[|\Z)", manifest, re.M | re.S):
        m = re.search(r'^\s*path\s*=\s*"([^"]+)"', section.group(2), re.M)
        if m:
            roots.append(os.path.join(crate_dir, m.group(1)))
    seen, out = set(), []
    for r in roots:
        r = os.path.normpath(r)
        if os.path.isfile(r) and r not in seen:
            seen.add(r)
            out.append(r)
    return out


def crates(root):
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        if "Cargo.toml" in files and os.path.isdir(os.path.join(dirpath, "src")):
            yield dirpath


def check(root):
    """(cycles, allowed, bare): each cycle as (sorted files, [(file, line, target file)])."""
    cycles, allowed, bare, seen = [], [], [], set()
    for crate_dir in crates(root):
        for target_root in crate_targets(crate_dir):
            mods = module_tree(target_root)
            rel = {m: os.path.relpath(p, root) for m, p in mods.items()}
            graph = {m: set() for m in mods}
            where = {}
            for m, path in mods.items():
                for target, line, ok, no_reason in imports(m, path, mods):
                    if no_reason:
                        bare.append(f"{rel[m]}:{line}")
                    if ok:
                        allowed.append(f"{rel[m]}:{line} -> {rel[target]}")
                        continue
                    graph[m].add(target)
                    where.setdefault((m, target), line)
            for comp in sccs(graph):
                files = tuple(sorted(rel[m] for m in comp))
                if files in seen:
                    continue
                seen.add(files)
                members = set(comp)
                edges = sorted((rel[a], line, rel[b]) for (a, b), line in where.items() if a in members and b in members)
                cycles.append((files, edges))
    return sorted(cycles), sorted(set(allowed)), sorted(set(bare))


def main(argv):
    root = argv[1] if len(argv) > 1 else "."
    cycles, allowed, bare = check(root)
    print(f"cycles {len(cycles)}")
    for files, edges in cycles:
        print("  " + " <-> ".join(files))
        for a, line, b in edges:
            print(f"      {a}:{line} -> {b}")
    if allowed:
        print(f"allowed by `// cycle-ok:` {len(allowed)}")
        for a in allowed:
            print("  " + a)
    for b in bare:
        print(f"refused: `// cycle-ok:` without a reason at {b}")
    return 1 if cycles or bare else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
