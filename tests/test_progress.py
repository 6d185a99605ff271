"""Progress bars in logs: off a terminal, a bar is drawn at most every 30 s instead of on every step."""
import io
import sys
import time

from stages.progress import LOG_INTERVAL_S, progress


def test_bar_in_a_log_file_is_drawn_rarely(monkeypatch):
    log = io.StringIO()  # not a terminal, like a cluster job's stderr
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress(range(40), desc="student", file=log):
        time.sleep(0.01)  # 0.4 s in all: plain tqdm would redraw about every 0.1 s
    assert log.getvalue().count("student") <= 2  # the first draw and the last


def test_bar_on_a_terminal_keeps_tqdm_defaults(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress(range(3)).mininterval < LOG_INTERVAL_S
    assert progress(range(3), mininterval=5).mininterval == 5
