"""Write one `## Section` of benchmarks/RESULTS.md, keeping the others."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def update_section(title: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section headed `## title` (or append it) with `text`."""
    heading = f"## {title}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = f"{heading}\n\n{text.strip()}\n\n"
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old)
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new.rstrip("\n") + "\n")
