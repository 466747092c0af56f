"""benchmarks/run_all.py regenerating docs/benchmarks.md: region replacement, rendering, --write.

No benchmark runs here: the scripts' runs are replaced by synthetic ScriptRun results.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import dependency, run_all
from benchmarks.run_all import PageError, ScriptRun, render_output, replace_regions

ROOT = Path(__file__).resolve().parents[1]

PAGE = """# Title

Intro with a number 3.14 that is prose.

<!-- run_all:machine -->
old header
<!-- /run_all:machine -->

## Alpha

Method of alpha.

<!-- run_all:alpha -->
| old | table |
|---|---|
| 1 | 2 |
<!-- /run_all:alpha -->

Reading alpha.

<!-- run_all:beta -->
<!-- /run_all:beta -->
tail
"""


def test_replace_regions_replaces_only_between_markers() -> None:
    new = replace_regions(PAGE, {"machine": "HEADER", "alpha": "\n\nA1\nA2\n", "beta": "B"})
    assert new == (
        "# Title\n\nIntro with a number 3.14 that is prose.\n\n"
        "<!-- run_all:machine -->\nHEADER\n<!-- /run_all:machine -->\n\n"
        "## Alpha\n\nMethod of alpha.\n\n"
        "<!-- run_all:alpha -->\nA1\nA2\n<!-- /run_all:alpha -->\n\n"
        "Reading alpha.\n\n"
        "<!-- run_all:beta -->\nB\n<!-- /run_all:beta -->\ntail\n"
    )


def test_replace_regions_twice_keeps_nothing_of_the_first_run() -> None:
    regions = {"machine": "h2", "alpha": "a2", "beta": "b2"}
    once = replace_regions(
        replace_regions(PAGE, {"machine": "h1", "alpha": "a1", "beta": "b1"}), regions
    )
    assert once == replace_regions(PAGE, regions)
    assert "a1" not in once and "old header" not in once and "| 1 | 2 |" not in once


@pytest.mark.parametrize(
    ("page", "message"),
    [
        (
            PAGE.replace("<!-- run_all:alpha -->\n", ""),
            "<!-- run_all:alpha --> must appear exactly once in the page, missing",
        ),
        (
            PAGE.replace("<!-- /run_all:beta -->", ""),
            "<!-- /run_all:beta --> must appear exactly once in the page, missing",
        ),
        (
            PAGE + "<!-- run_all:alpha -->\n",
            "<!-- run_all:alpha --> must appear exactly once in the page, found 2 times",
        ),
        (
            PAGE.replace(
                "<!-- run_all:beta -->\n<!-- /run_all:beta -->",
                "<!-- /run_all:beta -->\n<!-- run_all:beta -->",
            ),
            "<!-- /run_all:beta --> comes before <!-- run_all:beta -->",
        ),
        (
            PAGE + "<!-- run_all:gamma -->\n<!-- /run_all:gamma -->\n",
            "<!-- run_all:gamma -->: no such region",
        ),
    ],
)
def test_replace_regions_rejects_bad_markers(page: str, message: str) -> None:
    with pytest.raises(PageError) as info:
        replace_regions(page, {"machine": "h", "alpha": "a", "beta": "b"})
    assert message in str(info.value)


def test_replace_regions_rejects_a_region_inside_another() -> None:
    page = PAGE.replace(
        "<!-- /run_all:alpha -->", "<!-- run_all:beta -->\n<!-- /run_all:alpha -->", 1
    )
    page = page.replace("<!-- run_all:beta -->\n<!-- /run_all:beta -->", "<!-- /run_all:beta -->")
    with pytest.raises(PageError, match="region 'alpha' contains another run_all marker"):
        replace_regions(page, {"machine": "h", "alpha": "a", "beta": "b"})


def test_replace_regions_rejects_new_text_with_a_marker() -> None:
    with pytest.raises(PageError, match="new text of region 'alpha' contains a run_all marker"):
        replace_regions(PAGE, {"machine": "h", "alpha": "<!-- /run_all:beta -->", "beta": "b"})


def test_render_output_keeps_tables_and_fits_text_into_the_page() -> None:
    stdout = (
        "# compress-core overhead\n"
        "cpu: X (2 CPUs)\n"
        "  cnn: a model\n"
        "\n"
        "## Section title (10 rounds)\n"
        "\n"
        "| a | b |   \n"
        "|---|---|\n"
        "| 1 | 2 |\n"
        "\n"
        "ratio = median\n"
        "\n\n"
        "total 5 s\n"
    )
    assert render_output(stdout) == (
        "**compress-core overhead**\n\n"
        "```text\ncpu: X (2 CPUs)\n  cnn: a model\n```\n\n"
        "**Section title (10 rounds)**\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "ratio = median\n\n"
        "total 5 s"
    )


def _run(name: str, returncode: int = 0, stdout: str = "| x |\n|---|\n| 1 |\n") -> ScriptRun:
    return ScriptRun(
        name=name,
        args=["--markdown"],
        seconds=12.4,
        returncode=returncode,
        stdout=stdout,
        stderr="Traceback: boom\n",
        other_load=0.034,
    )


def test_render_region_states_command_duration_and_load() -> None:
    assert run_all.render_region(_run("alpha")) == (
        "`python benchmarks/alpha.py --markdown`: 12 s; other processes kept 0.03 CPUs busy "
        "meanwhile.\n\n| x |\n|---|\n| 1 |"
    )
    failed = run_all.render_region(_run("alpha", returncode=3))
    assert "**Failed with exit status 3:**\n\n```text\nTraceback: boom\n```" in failed


@pytest.fixture
def fake_scripts(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Two scripts, alpha and beta, whose runs are synthetic.

    ``calls`` records (name, quick) per run; a script named in ``failing`` exits with 1.
    """
    fake = SimpleNamespace(calls=[], failing=set())

    def fake_run(name: str, quick: bool) -> ScriptRun:
        fake.calls.append((name, quick))
        return _run(name, int(name in fake.failing), stdout=f"| {name} |\n|---|\n| 42 |\n")

    monkeypatch.setattr(run_all, "scripts", lambda: ["alpha", "beta"])
    monkeypatch.setattr(run_all, "run_script", fake_run)
    return fake


def test_write_fills_every_region_from_one_run(
    tmp_path: Path, fake_scripts: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    assert run_all.main(["--quick", "--write", str(page)]) == 0
    assert fake_scripts.calls == [("alpha", True), ("beta", True)]
    text = page.read_text()
    assert "| alpha |\n|---|\n| 42 |\n<!-- /run_all:alpha -->" in text
    assert "<!-- run_all:beta -->\n`python benchmarks/beta.py --markdown`: 12 s" in text
    header = text.split("<!-- run_all:machine -->\n")[1].split("<!-- /run_all:machine -->")[0]
    assert header.startswith("Generated by `python benchmarks/run_all.py --quick --write ")
    assert "**quick run**" in header and f"{os.cpu_count()} CPUs" in header
    # The prose is byte-for-byte what it was.
    assert "Intro with a number 3.14 that is prose.\n\n<!-- run_all:machine -->" in text
    assert "<!-- /run_all:alpha -->\n\nReading alpha.\n\n<!-- run_all:beta -->" in text
    assert text.endswith("<!-- /run_all:beta -->\ntail\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks.md"]  # no temp file left


def test_write_leaves_the_page_alone_when_a_script_fails(
    tmp_path: Path, fake_scripts: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    fake_scripts.failing.add("beta")
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    assert run_all.main(["--write", str(page)]) == 1
    assert page.read_text() == PAGE
    assert "beta failed" in capsys.readouterr().err


def test_write_checks_the_page_before_running_anything(
    tmp_path: Path, fake_scripts: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE.replace("<!-- /run_all:alpha -->", ""))
    assert run_all.main(["--write", str(page)]) == 2
    assert fake_scripts.calls == []
    assert "<!-- /run_all:alpha --> must appear exactly once" in capsys.readouterr().err


def test_write_refuses_only(fake_scripts: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "alpha", "--write", str(tmp_path / "p.md")])
    assert fake_scripts.calls == []


def test_atomic_write_keeps_the_old_file_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(run_all.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        run_all.write_atomically(page, "new")
    assert page.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]


def test_the_real_page_has_one_region_per_script() -> None:
    names = run_all.scripts()
    assert "run_all" not in names and "_machine" not in names
    assert {"overhead", "masks", "dependency", "speedup", "quantization"} <= set(names)
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert sorted(run_all.region_names(page)) == sorted(["machine", *names])
    replace_regions(page, {n: "" for n in ["machine", *names]})  # raises on a bad marker
    # --quick must be quick for every script, not just the ones someone remembered.
    assert set(run_all.QUICK) == set(names)


def test_dependency_markdown_table(capsys: pytest.CaptureFixture) -> None:
    dependency.print_markdown(
        [
            ("resnet_small", "eager", 0.004, 0.001, 0.005, 0.0025, ""),
            ("minilm", "auto", None, None, 0.06, None, "untracked: 2"),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[2]
        == "| resnet_small | eager | 0.0040 | 0.0010 | 0.0050 | 0.0025 | 2.00 | 0.03 | 0.17 |  |"
    )
    assert lines[3] == "| minilm | auto | - | - | 0.0600 | n/a | n/a | 0.12 | 0.50 | untracked: 2 |"
    assert {line.count("|") for line in lines} == {11}
