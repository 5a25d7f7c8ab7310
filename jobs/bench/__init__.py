"""The benchmarks: each a script that prints a table and can write a JSON record (`--record`), beside the three
entry points in `jobs/`.

    python -m jobs.bench                raw vLLM against the pipeline, same prompts and N (jobs/bench/pipeline.py)
    python -m jobs.bench.online         DeepConf online against full generation
    python -m jobs.bench.trace_path     the cost of each part of the trace path in one vLLM engine
    python -m jobs.bench.scaling        the pipeline on 1, 2, 4 ... GPUs
    python -m jobs.bench.scorer         the scorer against a bare forward pass
    python -m jobs.bench.reduce         the reducer on a synthetic run
    python -m jobs.bench.resume         the cost of resuming (scanning a finished run's shards)
    python -m jobs.bench.start          a small job's start and stop, step by step
"""
