from nanoseek.report import write_report


def test_report_tables_escape_pipes(tmp_path):
    (tmp_path / "run").mkdir()
    text = write_report(tmp_path / "run", {"Samples": {"sample 0": "<think>1+2=3 c0|4+5=9 c0</think>"}}).read_text()
    assert "| sample 0 | <think>1+2=3 c0\\|4+5=9 c0</think> |" in text
    assert text.startswith("# nanoseek run run\n")
