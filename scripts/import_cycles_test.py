#!/usr/bin/env python3
"""Tests of scripts/import_cycles.py on small crates written to a temporary folder:
`python3 scripts/import_cycles_test.py` (stdlib unittest)."""

import importlib.util
import io
import os
import sys
import tempfile
import textwrap
import unittest
from contextlib import redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("import_cycles", os.path.join(HERE, "import_cycles.py"))
import_cycles = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_cycles)


class ImportCycles(unittest.TestCase):
    def crate(self, files):
        """A workspace with one crate `c` holding `files` (path under src/ -> text)."""
        root = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(root))
        os.makedirs(os.path.join(root, "c", "src"))
        with open(os.path.join(root, "c", "Cargo.toml"), "w") as f:
            f.write('[package]\nname = "c"\n')
        for path, text in files.items():
            full = os.path.join(root, "c", "src", path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(textwrap.dedent(text))
        return root

    def cycles(self, files):
        cycles, allowed, bare = import_cycles.check(self.crate(files))
        return [" <-> ".join(f) for f, _ in cycles], allowed, bare

    def test_two_files_naming_each_other_are_a_cycle_and_the_exit_code_says_so(self):
        root = self.crate({"lib.rs": "mod a;\nmod b;\n", "a.rs": "use crate::b::B;\npub struct A;\n", "b.rs": "pub fn f() -> crate::a::A { todo!() }\npub struct B;\n"})
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(import_cycles.main(["x", root]), 1)
        self.assertIn("cycles 1\n  c/src/a.rs <-> c/src/b.rs\n", out.getvalue())
        self.assertIn("c/src/a.rs:1 -> c/src/b.rs", out.getvalue())

    def test_one_way_imports_pass(self):
        root = self.crate({"lib.rs": "mod a;\nmod b;\npub fn now() {}\n", "a.rs": "use crate::b::B;\nuse crate::now;\n", "b.rs": "pub struct B;\n"})
        with redirect_stdout(io.StringIO()):
            self.assertEqual(import_cycles.main(["x", root]), 0)

    def test_super_paths_between_siblings_are_read(self):
        found, _, _ = self.cycles({
            "lib.rs": "pub mod m;\n",
            "m/mod.rs": "mod x;\nmod y;\npub use x::X;\n",
            "m/x.rs": "use super::y::Y;\npub struct X;\n",
            "m/y.rs": "pub struct Y(super::x::X);\n",
        })
        self.assertEqual(found, ["c/src/m/x.rs <-> c/src/m/y.rs"])

    def test_a_child_naming_its_parents_items_is_a_cycle_when_the_parent_names_it_back(self):
        files = {
            "lib.rs": "pub mod m;\n",
            "m/mod.rs": "mod child;\npub struct Parent;\nfn f() { crate::m::child::run() }\n",
            "m/child.rs": "use super::Parent;\npub fn run() {}\n",
        }
        self.assertEqual(self.cycles(files)[0], ["c/src/m/child.rs <-> c/src/m/mod.rs"])
        files["m/child.rs"] = "// cycle-ok: the child reports to the actor that spawned it\nuse super::Parent;\npub fn run() {}\n"
        found, allowed, bare = self.cycles(files)
        self.assertEqual((found, allowed, bare), ([], ["c/src/m/child.rs:2 -> c/src/m/mod.rs"], []))

    def test_a_cycle_ok_without_a_reason_is_refused(self):
        root = self.crate({
            "lib.rs": "mod a;\nmod b;\n",
            "a.rs": "use crate::b::B; // cycle-ok:\npub struct A;\n",
            "b.rs": "use crate::a::A;\npub struct B;\n",
        })
        cycles, allowed, bare = import_cycles.check(root)
        self.assertEqual((len(cycles), allowed, bare), (1, [], ["c/src/a.rs:1"]))

    def test_comments_strings_and_test_modules_are_not_imports(self):
        found, _, _ = self.cycles({
            "lib.rs": "mod a;\nmod b;\n",
            "a.rs": "use crate::b::B;\npub struct A;\n",
            "b.rs": """\
                //! See [`crate::a::A`].
                pub struct B;
                /* crate::a::A */
                const S: &str = "crate::a::A";
                const R: &str = r#"use crate::a::A;"#;
                const C: char = '"';
                #[cfg(test)]
                mod tests {
                    use crate::a::A;
                    mod deeper { fn g() { super::super::super::a::A; } }
                }
                """,
        })
        self.assertEqual(found, [])

    def test_use_groups_aliases_and_globs_name_each_file(self):
        found, _, _ = self.cycles({
            "lib.rs": "mod a;\nmod b;\nmod d;\n",
            "a.rs": "use crate::{d::D, b as bee};\n",
            "b.rs": "use crate::d::*;\n",
            "d.rs": "use crate::{\n    a::{self},\n};\npub struct D;\n",
        })
        self.assertEqual(found, ["c/src/a.rs <-> c/src/b.rs <-> c/src/d.rs"])

    def test_files_no_mod_declares_and_visibility_paths_are_left_out(self):
        found, _, _ = self.cycles({
            "lib.rs": "mod a;\nmod b;\n",
            "a.rs": "pub(in crate::b) struct A;\nuse crate::b::B;\n",
            "b.rs": "pub struct B;\n",
            "orphan.rs": "use crate::a::A;\n",
        })
        self.assertEqual(found, [])

    def test_super_inside_an_inline_module_is_its_own_file(self):
        found, _, _ = self.cycles({
            "lib.rs": "mod a;\nmod b;\npub fn f() { crate::a::g() }\n",
            "a.rs": "use crate::b::B;\nmod inner { use super::Local; }\nstruct Local;\npub fn g() {}\n",
            "b.rs": "pub struct B;\n",
        })
        self.assertEqual(found, [])


if __name__ == "__main__":
    unittest.main(verbosity=1)
