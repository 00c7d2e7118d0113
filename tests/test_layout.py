"""The core stays one you read in one sitting: no module of core/ over 400 lines (split a module
by concern into a package when it grows, as recipe/ and manager/ were)."""
from pathlib import Path

CORE = Path(__file__).parent.parent / "core"


def test_no_core_module_is_over_400_lines():
    sizes = {str(p.relative_to(CORE)): len(p.read_text().splitlines())
             for p in CORE.rglob("*.py")}
    assert len(sizes) > 20  # the walk found the core
    assert {name: n for name, n in sizes.items() if n > 400} == {}
