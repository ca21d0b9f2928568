"""One folder, one training run, and a folder checked before anything is built: walked
through `python main.py` (tests/userpath.py). A second run in a folder is refused with the
holder named; the kernel frees the lock when its holder dies (kill -9); a `checkpoints`
that is a file, a read-only folder, a full disk, an empty configs/ and an oversized preset
each end in one line and exit code 2; a preset with many sources is summarised."""
import json
import re
import signal
import socket
import time
from collections import Counter

import pytest

from presets import PresetError, load_preset
from tests.sample_presets import CORPUS, ROOT, tiny_preset
from tests.userpath import make_project, run_main, start_main, torchrun_main
from tests.writefaults import ReadOnly, extra_only, main_with
from train.checkpoint_files import RUN_STATE
from train.run_lock import LOCK_FILE, FolderError, claim_folder, release_folder

pytestmark = pytest.mark.skipif(not (CORPUS / "books").is_dir(), reason=f"real-text corpus not found at {CORPUS}")


def flat(out: str) -> str:
    return re.sub(r"\s+", " ", out)


def read_until(proc, text: str, limit: float = 240.0) -> str:
    """The child's output up to the first line holding `text`."""
    seen, deadline = [], time.monotonic() + limit
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"{text!r} never came: {''.join(seen)}")


def refused_before_building(proc) -> str:
    out = flat(proc.stdout + proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert "[data]" not in out and "[model]" not in out, out  # nothing was built
    return out


def test_a_second_run_in_the_folder_is_refused_and_a_killed_holders_lock_is_free(tmp_path):
    project = make_project(tmp_path, [tiny_preset()])
    folder = project / "checkpoints"
    first = start_main(project, budget=10**6)
    try:
        read_until(first, "[train] ")
        second = run_main(project)
        out = refused_before_building(second)
        assert f"{folder} is in use by another training run (pid {first.pid}, started " in out, out
        assert first.poll() is None  # the first one goes on, untouched
        first.send_signal(signal.SIGINT)
        rest, _ = first.communicate(timeout=120)
        assert first.returncode == 130 and "[stop] saved the run at" in rest, rest
    finally:
        if first.poll() is None:
            first.kill()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len({r["run"] for r in rows}) == 1 and sum(r["kind"] == "run_start" for r in rows) == 1

    # kill -9 of the holder: no stale lock, the next start takes it (and resumes)
    holder = start_main(project, budget=10**6)
    read_until(holder, "[resume] continuing at")
    holder.kill()
    holder.wait()
    assert f"pid={holder.pid} " in (folder / LOCK_FILE).read_text()  # the dead holder's name stays in the file
    after = start_main(project, budget=10**6)
    try:
        read_until(after, "[resume] continuing at")
        after.send_signal(signal.SIGINT)
        rest, _ = after.communicate(timeout=120)
        assert after.returncode == 130 and "Traceback" not in rest, rest
    finally:
        if after.poll() is None:
            after.kill()


def test_the_lock_is_one_per_folder_and_the_same_process_may_claim_again(tmp_path):
    folder = tmp_path / "checkpoints"
    claim_folder(folder)
    claim_folder(folder)  # train() inside program.run(): the same process
    release_folder(folder)
    proc = start_main(make_project(tmp_path, [tiny_preset()]), budget=4096)  # another process: refused
    out = flat(proc.communicate(timeout=240)[0])
    assert proc.returncode == 2 and "is in use by another training run" in out, out
    release_folder(folder)
    with pytest.raises(FolderError, match="is a file, not a folder"):
        claim_folder(tmp_path / "configs" / "00_tiny.json")


def test_a_file_named_checkpoints_stops_the_start_in_one_line(tmp_path):
    project = make_project(tmp_path, [tiny_preset()])
    (project / "checkpoints").write_text("not a folder")
    out = refused_before_building(run_main(project))
    assert f"error: {project / 'checkpoints'} is a file, not a folder" in out, out


def test_a_missing_checkpoints_folder_is_created(tmp_path):
    project = make_project(tmp_path, [tiny_preset()])
    proc = run_main(project, budget=1024)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (project / "checkpoints" / "lm_current.pth").is_file()


def test_a_read_only_checkpoints_folder_stops_the_start_in_one_line(tmp_path):
    project = make_project(tmp_path, [tiny_preset()])
    ro = ReadOnly(project / "checkpoints", tmp_path)
    ro.make()
    try:
        proc = main_with(project, ro.pythonpath)
    finally:
        ro.undo()
    out = refused_before_building(proc)
    assert f"error: {project / 'checkpoints'} cannot be written (Read-only file system): make it writable" in out, out
    assert not (project / "checkpoints" / RUN_STATE).exists()


def test_a_full_disk_stops_the_start_in_one_line(tmp_path):
    project = make_project(tmp_path, [tiny_preset()])
    site = extra_only(tmp_path / "site", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                                         "import train.run_lock as r; r.free_bytes = lambda folder: 3 * 2**20")
    out = refused_before_building(main_with(project, site))
    assert f"error: {project / 'checkpoints'} is on a full disk (3.0 MB free): free some space" in out, out


def test_an_empty_configs_folder_is_exit_code_2(tmp_path):
    project = make_project(tmp_path, [])
    out = refused_before_building(run_main(project))
    assert f"{project / 'configs'}/: no presets here (a preset is a .json file)" in out, out


def test_a_preset_over_a_megabyte_is_refused_in_one_line(tmp_path):
    big = tiny_preset(description="x" * (2 * 2**20))
    project = make_project(tmp_path, [big])
    out = refused_before_building(run_main(project))
    assert "00_tiny.json: the file is 2.0 MB; a preset is at most 1 MB" in out, out
    with pytest.raises(PresetError, match="at most 1 MB"):
        load_preset(project / "configs" / "00_tiny.json")
    load_preset(make_project(tmp_path / "ok", [tiny_preset(description="x" * 100_000)]) / "configs" / "00_tiny.json")


def test_many_sources_are_summarised_in_the_start_line(tmp_path):
    sources = [{"type": "text", "path": str(CORPUS / "books"), "name": f"part{i:02d}"} for i in range(12)]
    project = make_project(tmp_path, [tiny_preset(data={"sources": sources})])
    proc = run_main(project, budget=1024)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    line = next(x for x in out.splitlines() if x.startswith("[data] 12 source(s)"))
    assert line.startswith("[data] 12 source(s): part00, part01, part02, part03, part04 and 7 more (all of them in "
                           "the run_start row of "), line
    start = json.loads((project / "checkpoints" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "run_start" and start["sources"] == [s["name"] for s in sources]
    assert len(line) < 200


def test_under_torchrun_every_line_is_printed_once(tmp_path):
    """Two ranks: rank 0 says everything (the kernels line included) and the other says nothing."""
    project = make_project(tmp_path, [tiny_preset(arch="hatchling")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = torchrun_main(project, 1024, port, nproc=2)
    out = proc.communicate(timeout=500)[0]
    assert proc.returncode == 0, out
    said = Counter(line for line in out.splitlines() if line.startswith(("model.ops:", "[", "no terminal")))
    assert any(line.startswith("[kernels] kda:") for line in said), out
    assert [line for line, n in said.items() if n > 1] == [], out
