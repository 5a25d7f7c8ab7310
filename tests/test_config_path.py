"""A configuration followed from jobs.main's flags to the shard writer enters no module more than twice (issue 28).

The path is what `python -m jobs.main` does (flags, plan, execute, select) on the in-process seam with the tiny
model and real transformers actors, for a new run and for its resume. An entry is a call, from another module of the
project, into a function that receives the run configuration (as an argument or as `self`); frames outside the
project (dataclasses, pyarrow, torch) are transparent. The configuration's own package (`ray_pipeline/config/`: its
sections, their rules and what it stores) is where the configuration lives, not a module it passes through, so calls
among its files and into its methods are not entries of the path.
"""

from __future__ import annotations

import collections
import sys

from conftest import run_in_process
from ray_pipeline.config import RunConfig

PROJECT = ("ray_pipeline", "actors", "jobs")
CONFIG_PACKAGE = "ray_pipeline.config"


def config_entries(job) -> tuple[collections.Counter, list[str]]:
    """Per module, the calls into it from another project module that receive a RunConfig; and each entry's
    caller -> callee, for the failure message."""
    entries, seen = collections.Counter(), []
    stack: list[str | None] = []

    def profile(frame, event, arg):
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            if not module.startswith(PROJECT):
                stack.append(None)
                return
            caller = next((m for m in reversed(stack) if m), None)
            stack.append(module)
            code = frame.f_code
            if caller is None or caller == module or module.startswith(CONFIG_PACKAGE):
                return
            # A call's locals are its arguments; dataclasses' generated methods are not a module's code.
            takes_config = any(isinstance(v, RunConfig) for v in frame.f_locals.values())
            if takes_config and "__create_fn__" not in code.co_qualname:
                entries[module] += 1
                seen.append(f"{caller} -> {module}:{code.co_qualname}")
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        job()
    finally:
        sys.setprofile(None)
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
