"""Kill a training job at seeded moments and resume it: the helper behind the kill tests."""
import os
import signal
import subprocess
import time

import torch


def logged_epochs(out):
    """Epochs recorded in ``out/log.jsonl`` so far."""
    log = out / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def descendants(pid):
    """Every living descendant of process ``pid`` (from /proc): torchrun starts its ranks in
    sessions of their own, out of reach of a kill of the launcher's process group."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            children.append(int(entry))
    return children + [grandchild for child in children for grandchild in descendants(child)]


def kill_and_resume(command, out, after_epochs, seed, env, resumable):
    """Start ``command(out, resume)`` once per entry of ``after_epochs``, each time SIGKILL its
    whole process group a seeded 0-0.3 s after ``out`` has logged that many epochs (so the kill
    lands mid-epoch, mid-save or between saves), resume from ``out/resumable`` when it exists,
    then run to the end. Returns how many jobs were killed (the rest ended by themselves)."""
    kills = 0
    delays = (torch.rand(len(after_epochs), generator=torch.Generator().manual_seed(seed)) * 0.3).tolist()
    for epochs, delay in zip(after_epochs, delays):
        job = subprocess.Popen(command(out, (out / resumable).exists()), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 200
        while logged_epochs(out) < epochs and job.poll() is None:
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)
        time.sleep(delay)
        if job.poll() is None:
            ranks = descendants(job.pid)
            os.killpg(job.pid, signal.SIGKILL)  # a launcher and all its ranks at once
            for rank in ranks:
                try:
                    os.kill(rank, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            kills += 1
        job.wait()
    subprocess.run(command(out, True), check=True, env=env, timeout=300, capture_output=True)
    return kills
