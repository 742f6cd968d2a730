"""The API's own records: jobs, job requests, pages and errors. Everything else the API returns is the
library's own model (RunRecord, FactorsRecord, SketchStore, Query, Document, QueryHits, ...)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from curator.catalog.ingest import IngestOptions
from curator.constants import ShardFormat
from curator.curate.mix import MixSpec
from curator.curate.rank import RankConfig
from curator.influence.fit import FitConfig
from curator.influence.score import ScoreConfig
from curator.sketch.store import SketchConfig

JobState = Literal["queued", "running", "done", "failed", "cancelled", "interrupted"]
JobKind = Literal["ingest", "fit", "score", "sketch", "index", "rank", "mix", "export", "audit"]
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
# Every kind resumes after a server is killed: fit, score, sketch and index pick up where they stopped
# (their parts, shards and first pass are on disk); ingest, rank, mix, export and audit run again from
# the start (an ingest keeps what it had read: its chunks are deduplicated on the way in), which gives
# the result an uninterrupted run would have.
RESUMABLE = ("ingest", "fit", "score", "sketch", "index", "rank", "mix", "export", "audit")
# Jobs that run a model or build an index take their device's lane; the others only read and write the
# catalog and artifacts, and share one lane of their own. One job per lane runs at a time.
DEVICE_KINDS = ("fit", "score", "sketch", "index")
CATALOG_LANE = "catalog"

MAX_PAGE = 500
T = TypeVar("T")


class Error(BaseModel):
    error: str = Field(description="what is wrong")
    field: str | None = Field(None, description="the request field it is about, e.g. body.config.max_docs")
    status: int


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class Progress(BaseModel):
    """A job's progress: units done of total (None: unknown) in its current stage, and the rate."""

    stage: str = ""
    unit: str = "documents"
    done: int = 0
    total: int | None = None
    rate: float = Field(0.0, description="units per second in this stage")
    tokens_per_second: float | None = None


class JobRecord(BaseModel):
    id: str
    kind: JobKind
    state: JobState
    params: dict
    device: str
    attempts: int = 0
    after: list[str] = Field(default_factory=list, description="jobs this one waits for (until they end)")
    progress: Progress | None = None
    result: Any = None
    error: str | None = None
    submitted_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


# -- job requests: one model per kind, the library's settings inside -------------------------------

class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None, max_length=100,
        description="ids of jobs this one waits for, until they end (done or not). Default: every job submitted "
                    "before it that has not ended, so a pipeline posted in order runs in order. [] runs it as "
                    "soon as its lane is free, beside jobs of other lanes.")


class IngestJob(_Job):
    kind: Literal["ingest"]
    paths: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        min_length=1, max_length=1000, description="files or folders on the server, inside its --root folders")
    options: IngestOptions


class FitJob(_Job):
    kind: Literal["fit"]
    config: FitConfig
    force: bool = False


class ScoreJob(_Job):
    kind: Literal["score"]
    config: ScoreConfig = ScoreConfig()
    force: bool = False


class SketchJob(_Job):
    kind: Literal["sketch"]
    config: SketchConfig
    holdout: str | None = None
    fidelity_sample: int = Field(200, ge=0, le=100_000)
    force: bool = False


class IndexJob(_Job):
    kind: Literal["index"]
    store: str | None = None
    factory: str = Field("auto", min_length=1, max_length=200)
    name: str | None = Field(None, min_length=1, max_length=200)
    rescore: int | None = Field(None, ge=0, le=100_000)
    nprobe: int | None = Field(None, ge=1, le=100_000)
    ef_search: int | None = Field(None, ge=1, le=100_000)
    retrain: bool = False


class RankJob(_Job):
    kind: Literal["rank"]
    config: RankConfig
    replace: bool = False


class MixJob(_Job):
    kind: Literal["mix"]
    spec: MixSpec
    replace: bool = False


class ExportJob(_Job):
    kind: Literal["export"]
    mixture: str = Field(min_length=1)
    format: ShardFormat = "parquet"
    out: str | None = Field(None, description="folder inside a --root; default: exports/MIXTURE in the workspace")
    shard_tokens: int | None = Field(None, gt=0)
    shard_bytes: int | None = Field(None, gt=0)
    tokenizer: str | None = None
    force: bool = False


class AuditJob(_Job):
    kind: Literal["audit"]
    run: str | None = Field(None, description="scoring run id (or prefix); default: the latest")


JobRequest = Annotated[IngestJob | FitJob | ScoreJob | SketchJob | IndexJob | RankJob | MixJob | ExportJob | AuditJob,
                       Field(discriminator="kind")]


def device_of(request: BaseModel) -> str:
    config = getattr(request, "config", None)
    return str(getattr(config, "device", None) or "cpu")


def lane_of(kind: str, device: str) -> str:
    """The queue a job waits in: its device ('cpu', 'cuda', 'mps') for model and index jobs, the catalog
    lane for the rest. 'cuda' is one lane: a server's jobs use its first GPU (torchrun spreads over more)."""
    if kind not in DEVICE_KINDS:
        return CATALOG_LANE
    return device.split(":", 1)[0] or "cpu"


def report_paths(root: Path) -> tuple[Path, Path]:
    """Where audit jobs write the report the API serves."""
    return root / "reports" / "audit.html", root / "reports" / "audit.json"
