"""The docs name only paths that exist: every `lcm_dist/...`, `launch/...`, `tests/...`,
`configs/...` and `docs/...` path in README.md and docs/*.md is a file or folder of the repo."""

from __future__ import annotations

import re

from tests.helpers import REPO

PATH = re.compile(r"(?<![\w./-])((?:lcm_dist|launch|tests|configs|docs)/[\w./-]*[\w/])")


def test_every_repo_path_in_the_docs_exists():
    missing = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for path in PATH.findall(line):
                if not (REPO / path).exists():
                    missing.append(f"{doc.relative_to(REPO)}:{number}: {path}")
    assert not missing, "\n".join(missing)
