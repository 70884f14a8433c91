#!/usr/bin/env python3
"""Fails when a workspace package declares a dependency its code never names.

For every package of the workspace, each entry of [dependencies], [dev-dependencies] and [build-dependencies]
must appear in the package's own Rust files (src/, tests/, benches/, examples/, build.rs; a member's folder
is not part of the root package) as `name::`, `use name`, `name!` or `extern crate name` (with `-` read as
`_`). A dependency needed only for its features or its links (never named in code) must say so in
Cargo.toml with a comment `# used-without-naming: <why>` on its line. Run by scripts/check.sh; exits 1 and
lists the unused ones.
"""
import pathlib
import re
import sys
import tomllib

root = pathlib.Path(__file__).resolve().parent.parent
ws = tomllib.loads((root / "Cargo.toml").read_text())
members = [root / m for m in ws["workspace"]["members"]]


def rust_files(pkg: pathlib.Path):
    skip = {root / ".deps", root / "target", root / "fuzz"} | (set(members) if pkg == root else set())
    for f in pkg.glob("*.rs"):  # build.rs and files it includes (e.g. nccl-sys/bindgen_config.rs)
        yield f
    for sub in ["src", "tests", "benches", "examples"]:
        p = pkg / sub
        if p.is_file():
            yield p
        elif p.is_dir():
            for f in p.rglob("*.rs"):
                if not any(s in f.parents for s in skip):
                    yield f


bad = []
for pkg in [root] + members:
    manifest = (pkg / "Cargo.toml").read_text()
    toml = tomllib.loads(manifest)
    code = "\n".join(f.read_text() for f in rust_files(pkg))
    for table in ["dependencies", "dev-dependencies", "build-dependencies"]:
        for name in toml.get(table, {}):
            ident = name.replace("-", "_")
            line = next((l for l in manifest.splitlines() if re.match(rf"\s*{re.escape(name)}\s*=", l)), "")
            if "used-without-naming:" in line:
                continue
            pat = rf"(\b{ident}::|\buse\s+{ident}\b|\b{ident}!|extern\s+crate\s+{ident}\b)"
            if not re.search(pat, code):
                bad.append(f"{pkg.relative_to(root) if pkg != root else '.'}/Cargo.toml [{table}] {name}")

if bad:
    print("unused dependencies (never named in the package's code):")
    for b in bad:
        print("  " + b)
    sys.exit(1)
print("check-deps: every declared dependency is used")
