"""`python -m jobs.bench`: raw vLLM against the pipeline (jobs/bench/pipeline.py)."""

import sys

from jobs.bench.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
