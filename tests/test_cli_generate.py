"""task=generate keeps its work: answers appended and flushed per question, Ctrl-C (SIGINT) exits 130 with the
finished rows in a valid jsonl, task.resume=true continues a file, concurrent runs get their own folders."""
import json
import os
import signal
import subprocess
import sys
import time

import main
from tests.conftest import ROOT

TINY = ["target=tiny_random", "drafter=noisy_copy", "tree=chain", "task=generate", "target.max_seq_len=256"]


def questions(path, n):
    path.write_text("".join(json.dumps({"question_id": i, "category": "c", "turns": [f"def f{i}(x):"]}) + "\n"
                            for i in range(n)))
    return path


def rows(answers):
    return [json.loads(line) for line in answers.read_text().splitlines()]


def test_sigint_keeps_finished_answers(tmp_path):
    q = questions(tmp_path / "q.jsonl", 20)
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "main.py", *TINY, f"prompts={q}", "task.max_new_tokens=160",
                          f"hydra.run.dir={run}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    answers = None
    while time.time() < deadline:  # wait for two finished answers, then Ctrl-C
        found = list(run.glob("answers-*.jsonl")) if run.is_dir() else []
        if found and found[0].read_text().count("\n") >= 2:
            answers = found[0]
            break
        time.sleep(0.05)
    assert answers is not None, "no answers appeared"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    kept = rows(answers)  # every line is a whole JSON row
    assert 2 <= len(kept) < 20 and f"{len(kept)} of 20 answers kept" in line
    assert [r["question_id"] for r in kept] == list(range(len(kept)))


def test_resume_and_no_overwrite(tmp_path, capsys):
    q = questions(tmp_path / "q.jsonl", 3)
    args = TINY + [f"prompts={q}", "task.max_new_tokens=4", f"hydra.run.dir={tmp_path / 'run'}"]
    assert main.cli(args + ["task.num_prompts=2"]) == 0
    [answers] = (tmp_path / "run").glob("answers-*.jsonl")
    first = answers.read_text()
    assert [r["question_id"] for r in rows(answers)] == [0, 1]
    capsys.readouterr()
    assert main.cli(args) == 2  # the same folder again without resume: refused, file untouched
    assert "task.resume=true" in capsys.readouterr().err and answers.read_text() == first
    assert main.cli(args + ["task.resume=true"]) == 0
    assert "2 questions already answered, 1 answered now" in capsys.readouterr().out
    assert answers.read_text().startswith(first) and [r["question_id"] for r in rows(answers)] == [0, 1, 2]


def test_concurrent_runs_get_their_own_folders(tmp_path):
    """Two runs started in the same second with the default hydra.run.dir (outputs/DATE/TIME-PID)."""
    cmd = [sys.executable, str(ROOT / "main.py"), *TINY, "task.max_new_tokens=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ps = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(2)]
    for p in ps:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    folders = sorted(tmp_path.glob("outputs/*/*"))
    assert len(folders) == 2
    for d in folders:
        [answers] = d.glob("answers-*.jsonl")
        assert len(rows(answers)) == 1


def test_failed_run_leaves_no_folder(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "main.py"), *TINY, "tree.k=-1"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: tree.k = -1")
    assert list(tmp_path.iterdir()) == []
