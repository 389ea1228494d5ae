"""The report's plots drawn two at a time: a forked helper process draws every other one."""

import os

import pytest

from ntrl.study import report


def _items(tmp_path, fail=()):
    def draw(i):
        def go(path):
            if i in fail:
                raise ValueError(f"nothing to draw for {i}")
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.plot([0, 1], [i, i + 1])
            fig.savefig(path)
            plt.close(fig)
            (path.parent / f"drawn-by-{os.getpid()}-{i}").write_text("")
        return go
    return [(f"plot {i}", tmp_path / f"p{i}.png", draw(i)) for i in range(5)]


def test_the_helper_draws_every_other_plot_and_the_report_keeps_their_order(tmp_path, capsys):
    items = _items(tmp_path, fail={3})
    plots = report.draw_items(tmp_path, items)
    assert [c for c, _ in plots] == ["plot 0", "plot 1", "plot 2", "plot 4"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for _, p in plots)
    drawers = {f.name.split("-")[3]: f.name.split("-")[2] for f in tmp_path.glob("drawn-by-*")}
    assert drawers["0"] == drawers["2"] == drawers["4"] == str(os.getpid())  # this process: the even ones
    assert drawers["1"] != str(os.getpid())  # a helper process: the odd ones
    assert "the plot p3.png was left out: nothing to draw for 3" in capsys.readouterr().err  # the helper's failure


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_plots_a_dead_helper_left_undrawn_are_drawn_here(tmp_path):
    here = os.getpid()
    items = _items(tmp_path)
    caption, path, draw = items[3]
    items[3] = (caption, path, lambda p: os._exit(3) if os.getpid() != here else draw(p))  # the helper dies on it
    assert report.draw_with_helper(items) == {i: None for i in range(5)}
    assert all(path.read_bytes().startswith(b"\x89PNG") for _, path, _ in items)
    # the helper answers for all its plots at once: dead, all of them are drawn here again
    assert (tmp_path / f"drawn-by-{here}-3").exists() and (tmp_path / f"drawn-by-{here}-1").exists()
    assert len(list(tmp_path.glob("drawn-by-*-1"))) == 2  # item 1: by the helper before it died, and here


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_stuck_helper_is_stopped_and_its_plots_drawn_here(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(report, "HELPER_GRACE_S", 0.5)
    here = os.getpid()
    items = _items(tmp_path)
    caption, path, draw = items[1]
    items[1] = (caption, path, lambda p: time.sleep(600) if os.getpid() != here else draw(p))  # stuck in the helper
    start = time.monotonic()
    assert report.draw_with_helper(items) == {i: None for i in range(5)}
    assert time.monotonic() - start < 60
    assert (tmp_path / f"drawn-by-{here}-1").exists() and (tmp_path / f"drawn-by-{here}-3").exists()
