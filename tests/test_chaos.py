"""The short version of scripts/chaos.py: the teacher SIGKILLed in a shard write and in a publish, resumed
each time to a store identical to an uninterrupted run. (Its student half, a kill between checkpoints
resumed to identical heads, is tests/test_student.py::test_killed_student_resumes_to_identical_heads.)
The full run, with random moments of every phase and several student kills: `python scripts/chaos.py`."""
import importlib.util
import os
import random
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "chaos.py")


def _chaos():
    spec = importlib.util.spec_from_file_location("chaos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_teacher_killed_in_a_write_and_a_publish_resumes_to_an_identical_store(model_dirs, data_root, tmp_path,
                                                                               monkeypatch):
    chaos = _chaos()
    real_phase, phases = chaos._phase, []

    def first_kill_misses(*args):  # as a late poll makes it: the first kill reads as landing after its phase
        phases.append(real_phase(*args))
        return "forward" if len(phases) == 1 else phases[-1]
    monkeypatch.setattr(chaos, "_phase", first_kill_misses)
    lines = []
    setup = chaos.Setup(str(tmp_path), model_dirs["idefics2"], data_root, num_queries=16, shots=4, shard_size=2,
                        env=chaos.child_env(str(tmp_path)))
    records = chaos.teacher_chaos(setup, kills=2, rng=random.Random(0), say=lines.append, modes=("write", "publish"))
    assert [r["phase"] for r in records] == ["write", "publish"], lines  # the missed kill is retried, not counted
    assert records[0]["retries"] >= 1 and len(phases) >= 3, lines
    assert any(line.startswith("kill aimed at write landed in forward") for line in lines), lines
    assert [line for line in lines if line.startswith("round")] and all(
        "identical" in line for line in lines if line.startswith("round")), lines
