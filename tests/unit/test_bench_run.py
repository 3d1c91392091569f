"""``bench/run.py``'s report: the busy condition is said in its table, and each table
goes between its own README markers."""

import pytest

from tests.conftest import load_bench


@pytest.fixture(scope="module")
def run():
    return load_bench("run")


def results(busy: int, load_max: float) -> dict:
    medians = {"samples_per_s": 10.0, "tokens_per_s": 100.0, "peak_rss_mb": 500.0}
    return {"command": "python bench/run.py", "threads": 1, "repeats": 3, "omp_wait_policy": "default",
            "busy_loops": busy, "file": "bench/results/peers_busy.json" if busy else "bench/results/peers.json",
            "load": {"min": 1.0, "max": load_max, "median": 1.5},
            "machine": {"cpu_model": "CPU", "nproc": 2, "versions": {}},
            "stages": {"sft": {"summary": {"medians": {"rlhflab": medians, "trl": dict(medians, samples_per_s=4.0)},
                                           "ratio": {"samples_per_s": 2.5}}}}}


def test_the_busy_table_says_so_and_names_its_file(run):
    busy = run.markdown_table(results(1, 2.4))
    assert "**1 busy loop spinning beside every run**" in busy and "1 thread per run" in busy
    assert "`bench/results/peers_busy.json`" in busy
    # the busy loop's own core is not "a loaded machine"; more than it is
    assert "a shared, loaded machine" not in busy
    assert "a shared, loaded machine" in run.markdown_table(results(1, 2.6))
    quiet = run.markdown_table(results(0, 1.2))
    assert "busy loop" not in quiet and "`bench/results/peers.json`" in quiet
    assert "| sft | 10.0 | 4.0 | **2.50x** |" in quiet


def test_each_table_between_its_own_markers(run, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold quiet\n<!-- bench:end -->\nmiddle\n"
                      "<!-- bench-busy:start -->\nold busy\n<!-- bench-busy:end -->\nend\n")
    monkeypatch.setattr(run, "ROOT", tmp_path)
    run.write_readme_table("new busy", "bench-busy")
    assert readme.read_text() == ("intro\n<!-- bench:start -->\nold quiet\n<!-- bench:end -->\nmiddle\n"
                                  "<!-- bench-busy:start -->\nnew busy\n<!-- bench-busy:end -->\nend\n")
    run.write_readme_table("new quiet")
    assert "new quiet\n<!-- bench:end -->" in readme.read_text() and "new busy" in readme.read_text()


def test_busy_loops_must_leave_a_cpu(run, capsys):
    import os

    with pytest.raises(SystemExit) as exit_:
        run.main(["--busy", str(len(os.sched_getaffinity(0))), "--stages", "sft"])
    assert exit_.value.code == 2
    assert "--busy must leave a CPU for the measured run" in capsys.readouterr().err
