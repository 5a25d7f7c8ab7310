"""The run manifest: what a run folder was made with (its fingerprint: `run_folder.fingerprint`), its shard plan,
and each shard's status; the names of run folders and best-answer files.

The default run folder name carries a hash of the fingerprint, so the same command resumes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from ray_pipeline.config import HUB_DATASET
from ray_pipeline.errors import PipelineError, first_line
from ray_pipeline.prompts import CHAT_INSTRUCTION, ORIGINAL_TEMPLATE
from ray_pipeline.storage import Location, StoragePath

MANIFEST_NAME = "manifest.json"
# Bump when the shard layout or the meaning of a stored score changes.
SHARD_FORMAT_VERSION = 2

COMMITTED, PENDING, FAILED = "committed", "pending", "failed"
STATUSES = (COMMITTED, PENDING, FAILED)


def code_version() -> str:
    try:
        package = importlib.metadata.version("ray-bestofn")
    except importlib.metadata.PackageNotFoundError:
        package = "source"
    return f"{package}+shards{SHARD_FORMAT_VERSION}"


def dataset_hash(problems: pa.Table) -> str:
    """Content hash of the planned problems: ids, texts, gold answers and their order."""
    digest = hashlib.sha256()
    for row in problems.select(["problem_id", "problem", "gold"]).to_pylist():
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def model_identity(resolved: str) -> str:
    """A cheap identity of a model folder (names, sizes and config of its files), or the Hub id."""
    folder = Path(resolved)
    if not folder.is_dir():
        return resolved
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    digest.update((folder / "config.json").read_bytes())
    return digest.hexdigest()[:16]


def content_entries(problems: pa.Table, resolved_model: str, prompt: str) -> dict:
    """The fingerprint entries of what a run reads besides its configuration: the model files' identity, the data
    set's content, the prompt template and the code version."""
    template = ORIGINAL_TEMPLATE if prompt == "original" else CHAT_INSTRUCTION
    return {
        "model": model_identity(resolved_model),
        # The content, so a moved or renamed copy of the same file resumes.
        "dataset": dataset_hash(problems),
        "prompt": f"{prompt}:{hashlib.sha256(template.encode()).hexdigest()[:12]}",
        "code_version": code_version(),
    }


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def dataset_name(dataset: str) -> str:
    """A short name for output files: 'math500' for MATH-500, else the file's or Hub id's last part."""
    if dataset == HUB_DATASET:
        return "math500"
    # A URI's query (s3://bucket/x.jsonl?endpoint_override=…) is no part of the file's name.
    path = dataset.split("?", 1)[0] if "://" in dataset else dataset
    stem = re.sub(r"\.(jsonl|json|parquet)$", "", path.rstrip("/").rsplit("/", 1)[-1], flags=re.I)
    return re.sub(r"[^a-z0-9]+", "", stem.lower())[:40] or "data"


# The run part of a default run id: the first 10 hex digits of the fingerprint's hash.
RUN_HASH = re.compile(r"[0-9a-f]{10}")
# The run part of a best-answer file named after a run id that needs escaping (see best_file_name).
ESCAPED_RUN = "run-"


def default_run_id(dataset: str, model_name: str, fp: dict) -> str:
    """`{dataset}_candidates_{model}_{hash}`: the same command and data give the same folder, so it resumes."""
    return f"{dataset_name(dataset)}_candidates_{model_name}_{fingerprint_hash(fp)[:10]}"


def best_file_name(dataset: str, model_name: str, run_id: str) -> str:
    """`{dataset}_best_{model}_{run}.jsonl`: one file per run folder, and never one for two run ids.

    The run part holds no `_`, so the name splits back into its parts (the data set's part holds
    none either, the model's may): the run part is the text after the last `_`. Three forms:

    - a default run id (`default_run_id` of this data set and model): its hash, 10 hex digits;
    - another run id with no `_` that is neither 10 hex digits nor starts with `run-`: the run id itself;
    - any other: `run-` and the run id with `%` and `_` written %25 and %5F.

    The three forms never meet, and each gives back its run id, so two run ids never share a file.
    """
    ds = dataset_name(dataset)
    default = f"{ds}_candidates_{model_name}_"
    tail = run_id.removeprefix(default)
    if not (run_id.startswith(default) and RUN_HASH.fullmatch(tail)):
        plain = "_" not in run_id and not RUN_HASH.fullmatch(run_id) and not run_id.startswith(ESCAPED_RUN)
        tail = run_id if plain else ESCAPED_RUN + run_id.replace("%", "%25").replace("_", "%5F")
    return f"{ds}_best_{model_name}_{tail}.jsonl"


def differences(old: dict, new: dict) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


@dataclass
class Manifest:
    run_id: str
    stamp: str
    model_name: str
    fingerprint: dict
    shards: dict[str, dict] = field(default_factory=dict)
    # The command that resumes this run (how its last job was started), for hints given elsewhere.
    command: str = ""
    # A digest of the shard plan as planned (plan_digest): a hand edit of the plan is told from the plan itself.
    plan_digest: str = ""

    @property
    def fingerprint_hash(self) -> str:
        return fingerprint_hash(self.fingerprint)

    @classmethod
    def plan(
        cls,
        run_id: str,
        stamp: str,
        model_name: str,
        fp: dict,
        rows: dict[int, int] | pa.Table,
        num_candidates: int,
    ):
        """A new run's manifest, every shard pending: from the run's problems (each shard lists its problem ids, in
        order), or from the rows each shard holds (benchmarks and tests of synthetic runs)."""
        if isinstance(rows, pa.Table):
            shards = planned_entries(rows, num_candidates)
            return cls(run_id, stamp, model_name, fp, shards, plan_digest=plan_digest(shards))
        shards = {
            str(s): {"problems": n // num_candidates, "rows": n, "status": PENDING} for s, n in sorted(rows.items())
        }
        return cls(run_id, stamp, model_name, fp, shards)

    def check_plan(self, run_dir: Location, problems: pa.Table | None, fix: str) -> None:
        """Refuse a shard plan that is not the one `jobs.infer` wrote: edited by hand, its shards would be checked
        against the edit (and a resume would never finish what the edit left out).

        With the run's `problems` (a resume) the plan must be theirs exactly; without (the reducer, which has no
        data set) it must be one jobs.infer could write: shards 0..k of shard_size problems, the last one fewer,
        rows = problems x N, and, where listed, one problem id per problem.
        """
        path = StoragePath.parse(run_dir) / MANIFEST_NAME
        fault = self._plan_fault(problems)
        if fault:
            raise PipelineError(f"{path}: the shard plan is not the one the run made ({fault}); {fix}")
        if problems is not None and not self.plan_digest:
            # A manifest written before shards listed their problem ids: the plan matched, so take the data's.
            for shard_id, entry in planned_entries(problems, self.num_candidates()).items():
                self.shards[shard_id]["problem_ids"] = entry["problem_ids"]
            self.plan_digest = plan_digest(self.shards)

    def num_candidates(self) -> int:
        n = self.fingerprint.get("num_return_sequences")
        return n if isinstance(n, int) else next((i["rows"] // i["problems"] for i in self.shards.values()), 0)

    def _plan_fault(self, problems: pa.Table | None) -> str | None:
        n = self.num_candidates()
        if problems is not None:
            expected = planned_entries(problems, n)
            if sorted(self.shards, key=int) != sorted(expected, key=int):
                return f"shards {_span(self.shards)}, the data set gives shards {_span(expected)}"
            for shard_id, want in expected.items():
                has = self.shards[shard_id]
                for key in ("problems", "rows", "problem_ids"):
                    if key in has and has[key] != want[key]:
                        return f"shard {shard_id}'s {key} {_short(has[key])}, the data set gives {_short(want[key])}"
            return None
        ids = sorted(int(s) for s in self.shards)
        if ids != list(range(len(ids))):
            return f"shards {_span(self.shards)}, not 0-{len(ids) - 1}"
        size = self.fingerprint.get("shard_size")
        for shard_id in ids:
            info = self.shards[str(shard_id)]
            last = shard_id == ids[-1]
            if isinstance(size, int) and not (0 < info["problems"] <= size and (last or info["problems"] == size)):
                return f"shard {shard_id} holds {info['problems']} problems, with shard_size {size}"
            if info["rows"] != info["problems"] * n:
                return f"shard {shard_id} holds {info['rows']} rows, {info['problems']} problems x {n} candidates"
            listed = info.get("problem_ids")
            if listed is not None and len(listed) != info["problems"]:
                return f"shard {shard_id} lists {len(listed)} problem ids for {info['problems']} problems"
        if self.plan_digest and plan_digest(self.shards) != self.plan_digest:
            return "its shards, problem counts or problem ids were edited after the run planned them"
        return None

    @classmethod
    def load(cls, run_dir: Location, fix: str = "pass --overwrite to start this run folder over") -> Manifest | None:
        """The folder's manifest, None if it has none; one that does not read is refused with `fix`."""
        path = StoragePath.parse(run_dir) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            manifest = cls(**json.loads(path.read_text()))
            shards_ok = isinstance(manifest.shards, dict) and all(
                isinstance(i, dict)
                and isinstance(i.get("rows"), int)
                and isinstance(i.get("problems"), int)
                and i.get("status") in STATUSES
                and isinstance(i.get("problem_ids", []), list)
                and all(isinstance(p, str) for p in i.get("problem_ids", []))
                for i in manifest.shards.values()
            )
            if not shards_ok or not isinstance(manifest.fingerprint, dict):
                raise ValueError("its shard plan or fingerprint is malformed")
            return manifest
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # ValueError covers broken JSON and bytes that are not UTF-8.
            reason = first_line(exc)
            raise PipelineError(
                f"{path} is not a readable manifest ({reason}); {fix}"
            ) from None

    def save(self, run_dir: Location) -> None:
        """Write atomically: a crash leaves the previous manifest, never half of one."""
        (StoragePath.parse(run_dir) / MANIFEST_NAME).write_text(
            json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        )

    def expected_rows(self) -> dict[int, int]:
        return {int(s): info["rows"] for s, info in self.shards.items()}

    def planned_shards(self) -> dict:
        """Each shard's planned problems and candidates (`shards.PlannedShard`), what the shard check holds it to."""
        from ray_pipeline.shards import planned_shards

        problems = {int(s): info["problems"] for s, info in self.shards.items()}
        ids = {int(s): tuple(info["problem_ids"]) for s, info in self.shards.items() if "problem_ids" in info}
        candidates = {info["rows"] // info["problems"] for info in self.shards.values() if info["problems"]}
        return planned_shards(problems, candidates.pop() if len(candidates) == 1 else 0, ids)

    def set_status(self, shard_id: int, status: str) -> None:
        self.shards[str(shard_id)]["status"] = status

    def with_status(self, status: str) -> list[int]:
        return sorted(int(s) for s, info in self.shards.items() if info["status"] == status)


def plan_digest(shards: dict[str, dict]) -> str:
    """What the shard plan holds (each shard's problems, rows and problem ids), not the statuses that change."""
    plan = {s: [info["problems"], info["rows"], info.get("problem_ids")] for s, info in shards.items()}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def planned_entries(problems: pa.Table, num_candidates: int) -> dict[str, dict]:
    """The manifest's shard entries for `problems` (in plan order): problems, rows, their ids, all pending."""
    entries: dict[str, dict] = {}
    for shard_id, problem_id in zip(problems.column("shard_id").to_pylist(), problems.column("problem_id").to_pylist()):
        entry = entries.setdefault(str(shard_id), {"problems": 0, "rows": 0, "problem_ids": [], "status": PENDING})
        entry["problems"] += 1
        entry["rows"] += num_candidates
        entry["problem_ids"].append(problem_id)
    return dict(sorted(entries.items(), key=lambda item: int(item[0])))


def _span(shards) -> str:
    ids = sorted(int(s) for s in shards)
    if not ids:
        return "none"
    return f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids))


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(repr, value[:3])) + (", …]" if len(value) > 3 else "]")
    return repr(value)
