"""A configuration followed from jobs.main's flags to the shard writer enters no module more than twice (issue 28).

The path is what `python -m jobs.main` does once its flags are parsed (plan, execute, select; `conftest.
run_in_process` makes the same calls as `jobs.main.main_job`, with execute on the in-process seam) with the tiny
model and real transformers actors, for a new run and for its resume. An entry is a call, from another module of the
project, into a function that receives the run configuration itself (as an argument or as `self`), in any thread;
a generator or coroutine resumed counts once. Frames outside the project (dataclasses, pyarrow, torch) are
transparent. Not counted: the configuration's own package (`ray_pipeline/config/`: its sections, their rules and
what it stores), where it lives rather than a module it passes through; and a configuration held inside another
object (the run folder keeps the one it was made for, `RunStats` the resolved one): a call on that object is the
object's own operation.
"""

from __future__ import annotations

import collections
import sys
import threading

from conftest import run_in_process
from ray_pipeline.config import RunConfig

PROJECT = ("ray_pipeline", "actors", "jobs")
CONFIG_PACKAGE = "ray_pipeline.config"


def config_entries(job) -> tuple[collections.Counter, list[str]]:
    """Per module, the calls into it from another project module that receive a RunConfig; and each entry's
    caller -> callee, for the failure message."""
    entries, seen, counted = collections.Counter(), [], set()
    stacks = threading.local()

    def profile(frame, event, arg):
        stack = stacks.__dict__.setdefault("frames", [])
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            if not module.startswith(PROJECT):
                stack.append(None)
                return
            caller = next((m for m in reversed(stack) if m), None)
            stack.append(module)
            # Dataclasses' generated methods are not a module's code; a resumed generator is the same call.
            if caller in (None, module) or module.startswith(CONFIG_PACKAGE) or frame.f_code.co_filename == "<string>":
                return
            # At a call, its locals are its arguments.
            if id(frame) not in counted and any(isinstance(v, RunConfig) for v in frame.f_locals.values()):
                counted.add(id(frame))
                frames.append(frame)  # kept alive, so no later frame reuses its id
                entries[module] += 1
                seen.append(f"{caller} -> {module}:{frame.f_code.co_name}")
        elif event == "return" and stack:
            stack.pop()

    frames: list = []
    before = sys.getprofile(), threading.getprofile()
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        job()
    finally:
        sys.setprofile(before[0])
        threading.setprofile(before[1])
    return entries, seen


def test_a_config_enters_no_module_more_than_twice_from_the_flags_to_the_shard_writer(tiny_model, tmp_path):
    argv = ["--model_path", tiny_model, "--dataset", "embedded:4", "--shard_size", "2"]
    argv += ["--num_return_sequences", "2", "--max_tokens", "4", "--backend", "hf", "--output_dir", str(tmp_path)]
    # A new run's path reaches the shard writer's caller and the actors; a resume of the finished run checks its
    # folder and selects again (nothing to generate): neither trace is empty by accident.
    reached = {"new run": {"ray_pipeline.run_folder", "ray_pipeline.inprocess", "actors.generator", "actors.scorer"}}
    reached["resume"] = {"ray_pipeline.run_folder", "ray_pipeline.selection"}
    for run in ("new run", "resume"):
        entries, seen = config_entries(lambda: run_in_process("jobs.main", *argv))
        assert reached[run] <= set(entries), (run, seen)
        over = {module: count for module, count in entries.items() if count > 2}
        assert over == {}, (run, over, seen)
