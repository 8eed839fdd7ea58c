"""Benchmark results name no directory of the machine that ran them (they are shared and committed)."""
from __future__ import annotations

import copy
import json
import re
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import REPO, path_roots, portable
from benchmarks.report import write_all

# A committed result (the search group: no plots of the timing grid, so writing it is quick).
RESULT = REPO / "benchmarks" / "results" / "vm-20261128-053910.json"
ABSOLUTE = re.compile(r"(^|[\s\"'=(:,])/[A-Za-z0-9_.~-]")


def _absolute_paths(text: str) -> list[str]:
    return [text[max(0, m.start() - 40): m.end() + 40] for m in ABSOLUTE.finditer(text)
            if not text[max(0, m.start() - 6): m.start() + 2].endswith(("://", ":/"))]


def test_writer_records_no_absolute_path(tmp_path):
    res = json.loads(RESULT.read_text())
    rows = copy.deepcopy(res["search"])
    work, out = tmp_path / "scratch", tmp_path / "results"
    res["settings"].update(
        command=f"python -m benchmarks --work {work} --out {out}",
        interpreter=sys.executable,
        export_dirs=[str(work / "export"), str(REPO / "exports" / "clap")],
        temp=str(Path(tempfile.gettempdir()) / "diffgap-x" / "in.json"),
        home=f"--cache {Path.home() / '.cache' / 'diffgap'}",
        elsewhere="perf_analyzer -f /opt/tritonclient/bin/pa.csv -u http://127.0.0.1:8000/v2 at 3.1 ms/req (1/2 of K)",
    )
    files = write_all(res, out, "run", work=work)
    text = Path(files["json"]).read_text() + Path(files["markdown"]).read_text()
    assert _absolute_paths(text) == []
    for d in (tmp_path, REPO, Path(sys.prefix), Path.home()):
        assert str(d) not in text, d
    saved = json.loads(Path(files["json"]).read_text())
    s = saved["settings"]
    assert s["command"] == "python -m benchmarks --work $WORK --out $OUT"
    assert s["export_dirs"] == ["$WORK/export", "exports/clap"]
    assert s["elsewhere"] == "perf_analyzer -f pa.csv -u http://127.0.0.1:8000/v2 at 3.1 ms/req (1/2 of K)"
    assert saved["search"] == rows  # the figures are untouched
    assert saved["files"] == {"json": "run.json", "markdown": "run.md", "plots": [Path(p).name for p in files["plots"]]}


def test_portable_leaves_non_paths_alone():
    roots = path_roots(work=Path("/scratch/w"))
    for s in ("R@1 / R@5", "ms/req", "http://host:1/v2/models/x", "1/2", "a|b", "~/x", "$WORK/y", "-p 3000"):
        assert portable(s, roots) == s, s
    assert portable({"a": ["/scratch/w/x/y.csv", 3.5]}, roots) == {"a": ["$WORK/x/y.csv", 3.5]}


def test_committed_results_name_no_machine_directory():
    for p in sorted((REPO / "benchmarks" / "results").glob("*.json")) + sorted((REPO / "benchmarks" / "results").glob("*.md")):
        assert _absolute_paths(p.read_text()) == [], p.name
