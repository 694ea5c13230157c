from growclip_daemon.status_text import render_status


def training_line(**training: object) -> str:
    text = render_status({"training": {"state": "running", "samples_trained": 1000, **training}})
    (line,) = [ln for ln in text.splitlines() if "training" in ln]
    return line


def test_the_status_says_when_a_due_growth_waits_for_its_search_budget() -> None:
    assert "growth" not in training_line(growth_waiting_for_budget=None)
    assert "waiting for its search budget" in training_line(growth_waiting_for_budget="search budget: ...")
    assert "growth search running" in training_line(growth_search_running=True)
