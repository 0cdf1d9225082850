"""The run lock appears with its content and fails closed: two trainers never hold one run."""

import json
import os
import socket

import pytest

from ddpmlab.errors import DDPMError
from ddpmlab.training.lock import LOCK_FILE, RunLock


def test_the_lock_never_exists_without_its_content(tmp_path, monkeypatch):
    seen = []
    real_link = os.link

    def watching_link(src, dst, *args, **kwargs):
        seen.append(json.loads(open(src).read()))  # what becomes visible is complete before it does
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", watching_link)
    with RunLock(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # no temporary file left
    assert seen and seen[0]["pid"] == os.getpid()
    assert not (tmp_path / "run").exists()  # nothing was written: the folder goes with the lock


def test_a_lock_that_cannot_be_read_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("")  # a trainer of an older release between its create and its write
    with pytest.raises(DDPMError, match="has a lock that cannot be read.*delete .*lock"):
        RunLock(run, say=lambda m: None).acquire()
    assert (run / LOCK_FILE).read_text() == ""  # left as it was


def test_a_fresh_lock_that_replaced_a_stale_one_is_put_back_without_hard_links(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    stale = json.dumps({"pid": 1, "host": socket.gethostname()})
    fresh = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"})
    (run / LOCK_FILE).write_text(fresh)  # a live trainer took the run after we read the stale lock

    def no_hard_links(*args, **kwargs):
        raise OSError("operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    RunLock(run)._remove_if_unchanged(stale)
    assert (run / LOCK_FILE).read_text() == fresh  # the live trainer keeps its lock
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]


def test_without_hard_links_the_lock_still_excludes_a_second_trainer(tmp_path, monkeypatch):
    def no_hard_links(*args, **kwargs):
        raise OSError("operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    with RunLock(tmp_path):
        with pytest.raises(DDPMError, match="is in use by another"):
            RunLock(tmp_path).acquire()
