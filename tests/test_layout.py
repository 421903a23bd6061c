"""docs/DESIGN.md's package layout lists every module of the package, at its place in the tree."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def listed_modules(doc: str) -> list[str]:
    """Paths under distbp/ named in the layout block (folders by indentation, files by name), in order."""
    block = doc.split("## Package layout", 1)[1].split("\n## ", 1)[0]
    paths, folders = [], {}
    for line in block.splitlines():
        m = re.match(r"^( {2,})(\S+)", line)
        if not m or not re.match(r"^(\w+/|[\w.]+\.py)$", m.group(2)):
            continue  # a description's continuation line
        depth, name = (len(m.group(1)) - 2) // 2, m.group(2)
        parent = "/".join(folders[d] for d in range(depth))
        path = f"{parent}/{name}" if parent else name
        if name.endswith("/"):
            folders[depth] = name.rstrip("/")
        elif name.endswith(".py"):
            paths.append(path)
    return paths


def test_design_lists_every_module_of_the_package():
    on_disk = {p.relative_to(ROOT / "distbp").as_posix() for p in (ROOT / "distbp").rglob("*.py")}
    on_disk -= {p for p in on_disk if p.endswith("__init__.py") and p != "__init__.py" and p != "nn/__init__.py"}
    names = listed_modules((ROOT / "docs" / "DESIGN.md").read_text())
    listed = set(names)
    assert len(names) == len(listed), f"docs/DESIGN.md lists {sorted({n for n in names if names.count(n) > 1})} twice"
    assert not on_disk - listed, f"docs/DESIGN.md's layout misses {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"docs/DESIGN.md's layout lists modules that do not exist: {sorted(listed - on_disk)}"
