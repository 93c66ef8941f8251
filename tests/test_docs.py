"""The documentation site builds from a clean checkout: a page per notebook, an index, no broken link."""
import subprocess
from pathlib import Path

from processes import command

ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_site_has_a_page_per_notebook_and_no_broken_link(tmp_path):
    r = subprocess.run([command("tradelab"), "docs", "--out", str(tmp_path / "site")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    notebooks = {p.relative_to(ROOT / "nbs").with_suffix(".html") for p in (ROOT / "nbs").rglob("*.ipynb")
                 if not any(part.startswith((".", "_")) for part in p.relative_to(ROOT / "nbs").parts)}
    pages = {p.relative_to(tmp_path / "site") for p in (tmp_path / "site").rglob("*.html")} - {Path("contents.html")}
    assert pages == notebooks  # index.ipynb is the home page, index.html
    contents = (tmp_path / "site" / "contents.html").read_text()
    assert all(str(p) in contents for p in notebooks)
    assert "Plotly.newPlot" in (tmp_path / "site" / "quickstart.html").read_text()  # the kept charts are drawn
