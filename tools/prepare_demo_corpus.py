"""Build the demo model's training text from the Python 3.11 documentation Debian installs.

    apt-get install python3.11-doc
    python tools/prepare_demo_corpus.py [--out .corpus]

Source: the reST sources of the Python documentation (``/usr/share/doc/python3.11/html/_sources``,
Debian package ``python3.11-doc``), licensed under the PSF License Agreement (code examples in them
also under Zero-Clause BSD): permissive, compatible with the project's Apache-2.0. ``license.rst``
and ``copyright.rst`` are left out (they quote other projects' licence texts). GCIDE (``dict-gcide``)
would add English prose but is GPL-3, which we do not want baked into weights shipped in an
Apache-2.0 repository, so it is not used.

Each document is turned into plain text (reST roles, targets, index entries and section
underlines removed; code examples kept) and assigned by a hash of its path to one split:
``train.txt`` (about 94%), ``valid.txt`` (about 3%, for early stopping) and ``heldout.txt``
(about 3%, reported only). Documents are separated by ``<|endoftext|>``. The output folder holds
its own ``.gitignore`` so nothing in it is committed; ``manifest.json`` lists every source file with
its sha256 and split. ``--snippet`` also writes a few KB of held-out text for the regression test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
from pathlib import Path

SOURCE_DIR = Path("/usr/share/doc/python3.11/html/_sources")
PACKAGE = "python3.11-doc"
LICENSE = "PSF-2.0 (Python Software Foundation License Agreement); code examples also 0BSD"
EXCLUDED = {"license.rst.txt", "copyright.rst.txt"}
DOC_SEPARATOR = "<|endoftext|>"
SPLITS = {"valid": range(0, 3), "heldout": range(3, 6)}  # hash buckets out of 100; the rest trains
SUBSTITUTIONS = {"|version|": "3.11", "|release|": "3.11", "|today|": "", "|python_version_literal|": "3.11"}

# Directives whose whole block is markup, not text.
DROPPED_DIRECTIVES = {
    "index", "toctree", "highlight", "highlightlang", "sectionauthor", "moduleauthor", "tabularcolumns",
    "raw", "only", "testsetup", "testcleanup", "include", "literalinclude", "csv-table", "image",
    "figure", "audit-event-table", "availability", "impl-detail", "productionlist", "opcode",
    "currentmodule", "program", "cmdoption", "envvar", "option", "describe", "role", "pdbcommand",
    "2to3fixer", "_",
}
LABELS = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "caution": "Caution:",
          "important": "Important:", "tip": "Tip:", "hint": "Hint:", "attention": "Attention:"}
VERSION_NOTES = {"versionadded": "New in version", "versionchanged": "Changed in version",
                 "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version"}

ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``")
REFERENCE = re.compile(r"`([^`<]+?)\s*<[^>]+>`_{1,2}")
EMPHASIS_REF = re.compile(r"`([^`]+)`_{1,2}")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:(\w[\w:-]*)::\s*(.*)|(_[^:]*:.*)|(.*))$")
UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_<>])\1{2,}\s*$")


def role_text(match: re.Match) -> str:
    """:func:`os.path.join` -> os.path.join; :ref:`text <target>` -> text; :class:`~a.B` -> B."""
    text = match.group(1).lstrip("!")
    if "<" in text and text.endswith(">"):
        return text[: text.index("<")].rstrip()
    if text.startswith("~"):
        return text[1:].rsplit(".", 1)[-1]
    return text


def inline_text(line: str) -> str:
    line = ROLE.sub(role_text, line)
    line = LITERAL.sub(r"\1", line)
    line = REFERENCE.sub(r"\1", line)
    line = EMPHASIS_REF.sub(r"\1", line)
    for key, value in SUBSTITUTIONS.items():
        line = line.replace(key, value)
    return line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _directive_line(indent: str, name: str, argument: str) -> str | None:
    """What a kept directive's first line becomes (None: nothing)."""
    if name in LABELS:
        return indent + LABELS[name] + (" " + inline_text(argument) if argument else "")
    if name in VERSION_NOTES:
        return indent + f"{VERSION_NOTES[name]} {argument.strip()}."
    if argument and (name.split(":")[-1] in {"function", "method", "class", "attribute", "data", "exception",
                                              "decorator", "module", "macro", "member", "type", "var",
                                              "classmethod", "staticmethod", "abstractmethod", "coroutinefunction",
                                              "coroutinemethod", "decoratormethod", "property"}):
        return indent + inline_text(argument)
    return None


def rst_to_text(source: str) -> str:
    """reST -> readable plain text (markup dropped, prose and code examples kept)."""
    out: list[str] = []
    skip_below: int | None = None  # drop lines indented deeper than this (a dropped directive's body)
    for raw in source.splitlines():
        line = raw.rstrip()
        if skip_below is not None:
            if not line or _indent(line) > skip_below:
                continue
            skip_below = None
        if UNDERLINE.match(line):
            continue
        match = DIRECTIVE.match(line)
        if match:
            indent, name, argument = match.group(1), match.group(2), match.group(3) or ""
            if name is None or name in DROPPED_DIRECTIVES or name.split(":")[-1] in DROPPED_DIRECTIVES:
                skip_below = len(indent)  # comment, target or markup directive: drop it and its body
                continue
            kept = _directive_line(indent, name, argument)
            if kept is not None:
                out.append(kept)
            continue
        if line.strip() == "::":
            continue
        if line.endswith("::"):
            line = line[:-1]
        out.append(inline_text(line))
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def split_of(relative: str) -> str:
    bucket = int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 100
    return next((name for name, buckets in SPLITS.items() if bucket in buckets), "train")


def package_version(package: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(source_dir: Path) -> list[tuple[str, bytes]]:
    if not source_dir.is_dir():
        raise SystemExit(f"{source_dir} not found: install the Debian package {PACKAGE} (apt-get install {PACKAGE})")
    files = sorted(p for p in source_dir.rglob("*.rst.txt") if p.name not in EXCLUDED or p.parent != source_dir)
    return [(str(p.relative_to(source_dir)), p.read_bytes()) for p in files]


def write_snippet(heldout_docs: list[str], path: Path, size: int = 4000) -> None:
    """About ``size`` characters of held-out prose, cut at paragraph boundaries."""
    paragraphs = [p for doc in heldout_docs for p in doc.split("\n\n") if len(p) > 200 and ">>>" not in p]
    chosen, total = [], 0
    for paragraph in paragraphs:
        if total >= size:
            break
        chosen.append(paragraph)
        total += len(paragraph) + 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(chosen) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=SOURCE_DIR)
    parser.add_argument("--out", type=Path, default=Path(".corpus"))
    parser.add_argument("--snippet", type=Path, default=None,
                        help="also write a few KB of held-out text here (tests/data/heldout_snippet.txt)")
    args = parser.parse_args(argv)

    docs: dict[str, list[str]] = {"train": [], "valid": [], "heldout": []}
    manifest = []
    for relative, data in collect(args.source):
        split = split_of(relative)
        text = rst_to_text(data.decode("utf-8"))
        docs[split].append(text)
        manifest.append({"file": relative, "sha256": hashlib.sha256(data).hexdigest(), "split": split,
                         "chars": len(text)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ".gitignore").write_text("*\n")
    for split, texts in docs.items():
        (args.out / f"{split}.txt").write_text(f"\n{DOC_SEPARATOR}\n".join(texts), encoding="utf-8")
    (args.out / "manifest.json").write_text(json.dumps({
        "source_dir": str(args.source), "package": PACKAGE, "package_version": package_version(PACKAGE),
        "license": LICENSE, "excluded": sorted(EXCLUDED), "document_separator": DOC_SEPARATOR,
        "files": manifest,
    }, indent=1) + "\n")
    for split, texts in docs.items():
        print(f"{split:8s} {len(texts):4d} documents {sum(map(len, texts)) / 1e6:6.2f} M chars")
    if args.snippet:
        write_snippet(docs["heldout"], args.snippet)
        print(f"snippet  {args.snippet} ({args.snippet.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
