"""The report's files for known results: planted regressions named in the markdown and marked in the HTML, and
a report even when no cell of a result ran."""

from bench.report import write_report
from tests.bench.test_compare import CELLS, make_result

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_names_the_planted_regression(tmp_path):
    base, cand = make_result(seed=1, name="base"), make_result({CELLS[1]: 1.5}, seed=2, name="cand")
    flags = write_report([base, cand], tmp_path, threshold=0.1)
    assert flags == {"cand": [("tiny-qwen2.5", "tp2", "host")]}
    md = (tmp_path / "report.md").read_text()
    assert "Flagged: 1 regression(s): tiny-qwen2.5/tp2/host; 0 improvement(s): none" in md
    assert "mismatch/kl" in md  # rollout–trainer mismatch, shown per cell when runs log it
    html = (tmp_path / "report.html").read_text()
    assert html.count('<td class=regression>regression</td>') >= 2  # the row's verdict and its metrics
    assert html.count("data:image/png;base64,") == 4
    assert all((tmp_path / f).read_bytes().startswith(PNG) for f in ("stage_times.png", "mfu.png", "reward.png"))
    assert (tmp_path / "comparison.csv").read_text().count("regression") >= 2


def test_a_result_whose_cells_all_failed_still_gets_a_report(tmp_path):
    result = make_result(name="only-failures")
    for cell in result.cells:
        cell.status, cell.episodes, cell.stderr_tail = "failed", [], "Traceback ...\nRuntimeError: launcher missing"
    assert write_report([result], tmp_path, threshold=0.1) == {}
    md = (tmp_path / "report.md").read_text()
    assert "RuntimeError: launcher missing" in md and (tmp_path / "report.html").exists()
