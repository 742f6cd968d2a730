"""`curator evaluate`: train each arm at equal tokens, measure it, record it, report it.

  plan       read-only: every arm's documents (arms.py), the held-out queries (heldout.py) and text,
             the starting model; any bad request is one error here, before the catalog is written
             (then the evaluation's row, and the token counts the plan made, in one transaction);
  base       the starting model measured: the reference row;
  arms       seed by seed, arm by arm, the one training loop (train.py), then the measurements
             (measure.py); each finished arm leaves `result.json` in its folder and a row in
             `evaluation_results`, so a killed evaluation resumes at its first unfinished arm, from
             that arm's last checkpoint;
  report     means with 95% intervals over seeds, paired verdicts with intervals over seeds and over
             held-out queries (stats.py), HTML + JSON (report.py) in the workspace's reports folder,
             beside the audit.

The work folder is reports/evaluations/ID, ID a hash of the settings (less the device and the
bootstrap's, which change no arm's numbers), the starting model, every arm's documents and the
held-out queries and text: the same command finds it again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel

from curator import __version__
from curator.artifacts import content_id, write_text_atomic
from curator.catalog.database import Catalog
from curator.catalog.documents import read_texts
from curator.catalog.queries import Query
from curator.catalog.records import get_run, store_token_counts
from curator.catalog.workspace import Workspace
from curator.errors import CuratorError
from curator.evaluate import measure, stats
from curator.evaluate.arms import ArmPlan, plan_arms, starting_model
from curator.evaluate.config import Arm, ArmResult, EvaluateConfig
from curator.evaluate.heldout import heldout_queries
from curator.evaluate.report import write_report
from curator.evaluate.train import STATE_FILE, Progress, data_order, packed_sequences, train_arm

RESULT_FILE = "result.json"


class Plan(BaseModel):
    """Everything an evaluation needs, read from the catalog in one read-only open."""

    config: EvaluateConfig
    arms: ArmPlan
    queries: list[Query]
    heldout_texts: list[str]
    texts: dict[int, str]         # every arm document's text
    model_name: str               # what load_model is given
    model_id: str                 # the ranking's model
    tokenizer_id: str
    chat_template: str
    id: str


def plan(ws: Workspace, config: EvaluateConfig) -> Plan:
    if config.steps < 1:
        raise CuratorError(f"--tokens {config.tokens:,} is less than one batch ({config.batch_rows} sequences × "
                           f"{config.seq_len} tokens = {config.batch_tokens:,}); raise --tokens or lower the batch")
    if config.from_scratch and not Path(config.from_scratch).is_file():
        raise CuratorError(f"--from-scratch {config.from_scratch}: no such file (a JSON model config, e.g. "
                           f'{{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, ...}})')
    with Catalog.open(ws) as catalog:
        arms = plan_arms(catalog, config)
        queries = heldout_queries(catalog, config, arms.rankings)
        run = get_run(catalog, arms.rankings[0].run_id)
        model_name, model_id = starting_model(catalog, arms.rankings[0], config.model)
        texts = {}
        wanted = sorted({d for arm in arms.arms for d in arm.doc_ids})
        for chunk in read_texts(catalog, wanted):
            texts.update(chunk)
        heldout = {}
        for chunk in read_texts(catalog, arms.heldout_doc_ids):
            heldout.update(chunk)
    scratch = Path(config.from_scratch).read_text() if config.from_scratch else None
    identity = [measure.VERSION, config.identity(), model_id, scratch,
                [(a.name, a.seed, a.doc_ids) for a in arms.arms], arms.heldout_doc_ids,
                [(q.id, q.task, q.prompt, q.completion) for q in queries]]
    return Plan(config=config, arms=arms, queries=queries, heldout_texts=[heldout[d] for d in arms.heldout_doc_ids],
                texts=texts, model_name=model_name, model_id=model_id,
                tokenizer_id=arms.rankings[0].tokenizer_id, chat_template=run.settings.get("chat_template", "auto"),
                id=content_id("eval", *identity))


def work_folder(ws: Workspace, evaluation_id: str) -> Path:
    return ws.artifact_dir("reports") / "evaluations" / evaluation_id


# -- the model ---------------------------------------------------------------------------

class Starting:
    """The starting model: loaded once, its initial weights kept aside and put back before each arm."""

    def __init__(self, the_plan: Plan):
        from curator.model.loading import load_model, load_tokenizer

        config = the_plan.config
        self.device = config.device
        if config.from_scratch:
            self.tokenizer = load_tokenizer(the_plan.model_name)
            self.scratch = json.loads(Path(config.from_scratch).read_text())
            self.model = self._new(0)
            self.name = f"from scratch ({Path(config.from_scratch).name})"
            self.same_as_ranking = False
        else:
            loaded = load_model(the_plan.model_name, device=config.device)
            # Another starting model is allowed when asked for by name; the report says so.
            self.same_as_ranking = loaded.info.id == the_plan.model_id
            if not self.same_as_ranking and config.model is None:
                raise CuratorError(f"the model at {the_plan.model_name} is not the one the ranking was scored "
                                   f"with (its weights changed); pass --model")
            self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, loaded.info.name
            self.scratch = None
        from curator.model.loading import tokenizer_hash

        if tokenizer_hash(self.tokenizer) != the_plan.tokenizer_id:
            raise CuratorError(f"the tokenizer of {the_plan.model_name} is not the ranking's: the arms' token counts "
                               f"would not be the tokens trained on")
        self._state_seed = None
        self._state = None

    def _new(self, seed: int):
        import torch
        import transformers

        settings = dict(self.scratch)
        kind = settings.pop("model_type", None)
        if not kind:
            raise CuratorError("--from-scratch: the config needs a model_type (e.g. llama)")
        settings.setdefault("vocab_size", len(self.tokenizer))
        if settings["vocab_size"] < len(self.tokenizer):
            raise CuratorError(f"--from-scratch: vocab_size {settings['vocab_size']} is smaller than the "
                               f"tokenizer's {len(self.tokenizer)} tokens")
        try:
            model_config = transformers.AutoConfig.for_model(kind, **settings)
        except (ValueError, TypeError) as exc:
            raise CuratorError(f"--from-scratch: {exc}") from None
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(model_config).to(self.device)

    def initial_state(self, seed: int) -> dict:
        """The weights every arm of this seed starts from (from scratch: a fresh init per seed)."""
        key = seed if self.scratch is not None else 0
        if self._state_seed != key:
            source = self._new(seed) if self.scratch is not None else self.model
            self._state = {k: v.detach().clone() for k, v in source.state_dict().items()}
            self._state_seed = key
        return self._state


# -- measuring ----------------------------------------------------------------------------

class Measures:
    def __init__(self, the_plan: Plan, starting: Starting):
        tokenizer, config = starting.tokenizer, the_plan.config
        self.plan, self.tokenizer = the_plan, tokenizer
        max_len = int(getattr(starting.model.config, "max_position_embeddings", 0) or 2048)
        self.queries = the_plan.queries
        self.query_windows = measure.query_windows(tokenizer, self.queries, max_len, the_plan.chat_template)
        self.text_windows = measure.text_windows(tokenizer, the_plan.heldout_texts, config.seq_len)
        self.checked = measure.checkable(self.queries)

    def curve_point(self, model) -> dict:
        per_query = measure.completion_losses(model, self.tokenizer, self.queries, self.query_windows)
        reasoning, control = measure.split_means(self.queries, per_query)
        return {"reasoning_loss": reasoning, "factual_loss": control}

    def full(self, model, arm: str, kind: str, seed: int, arm_docs: Arm | None, curve: list[dict],
             started: float) -> tuple[ArmResult, list[dict]]:
        config = self.plan.config
        per_query = measure.completion_losses(model, self.tokenizer, self.queries, self.query_windows)
        reasoning, control = measure.split_means(self.queries, per_query)
        ppl = measure.perplexity(model, self.tokenizer, self.text_windows)
        acc, per_task_acc, records = measure.accuracy(model, self.tokenizer, self.checked, self.plan.chat_template,
                                                      config.max_new_tokens)
        result = ArmResult(
            arm=arm, kind=kind, seed=seed, documents=len(arm_docs.doc_ids) if arm_docs else 0,
            distinct_tokens=arm_docs.tokens if arm_docs else 0,
            trained_tokens=config.steps * config.batch_tokens if arm_docs else 0,
            reasoning_loss=reasoning, factual_loss=control, general_ppl=ppl, accuracy=acc,
            per_task_loss=measure.task_means(self.queries, per_query), per_task_accuracy=per_task_acc,
            curve=[*curve, {"tokens": config.steps * config.batch_tokens if arm_docs else 0,
                            "reasoning_loss": reasoning, "factual_loss": control}],
            seconds=time.perf_counter() - started,
            per_query=measure.by_metric(self.queries, per_query, records))
        return result, records


# -- the evaluation -------------------------------------------------------------------------

def evaluate(ws: Workspace, config: EvaluateConfig, *, progress: Progress | None = None,
             out: Path | None = None) -> dict:
    """Run (or resume) an evaluation; returns the report's data (also written as HTML + JSON)."""
    progress = progress or Progress()
    progress.stage("planning the arms")
    the_plan = plan(ws, config)
    folder = work_folder(ws, the_plan.id)
    progress.stage(f"loading {the_plan.model_name}")
    starting = Starting(the_plan)
    measures = Measures(the_plan, starting)
    folder.mkdir(parents=True, exist_ok=True)
    _write_plan(folder, the_plan)
    _record_start(ws, the_plan)
    model = starting.model
    results: list[ArmResult] = []
    for seed in range(config.seeds):
        initial = starting.initial_state(seed)
        base_folder = folder / f"base-s{seed}"
        base = _finished(base_folder)
        if base is None:
            progress.stage(f"measuring the starting model (seed {seed})")
            if starting.scratch is None and seed > 0:      # continued pretraining: one base for every seed
                base = _finished(folder / "base-s0").model_copy(update={"seed": seed})
            else:
                model.load_state_dict(initial)
                base, records = measures.full(model, "base", "base", seed, None, [], time.perf_counter())
                _save_records(base_folder, records)
            _finish(ws, the_plan, base_folder, base)
        results.append(base)
        for arm in [a for a in the_plan.arms.arms if a.seed == seed]:
            arm_folder = folder / arm.label
            done = _finished(arm_folder)
            if done is None:
                done = _train_and_measure(model, initial, base, the_plan, starting, measures, arm, arm_folder,
                                          progress)
                _finish(ws, the_plan, arm_folder, done)
            results.append(done)
    data = report_data(the_plan, starting.name, results)
    data["setup"]["starting_model_is_the_rankings"] = starting.same_as_ranking
    html_path = out or ws.artifact_dir("reports") / f"evaluation-{the_plan.id}.html"
    json_path = html_path.with_suffix(".json")
    write_report(data, html_path, json_path)
    data["report"], data["report_json"] = str(html_path), str(json_path)
    with Catalog.open(ws, write=True) as catalog:
        # Every finished arm's row again (idempotent): a resumed run trusts `result.json`, so an arm whose
        # row was never written (the catalog was busy when it finished) is recorded here.
        _record_results(catalog, the_plan, results)
        catalog.sql("UPDATE evaluations SET state = 'done', report = ?, finished_at = current_timestamp "
                    "WHERE id = ?", [str(html_path), the_plan.id])
    return data


def _train_and_measure(model, initial: dict, base: ArmResult, the_plan: Plan, starting: Starting,
                       measures: Measures, arm: Arm, folder: Path, progress: Progress) -> ArmResult:
    config = the_plan.config
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    ordered = data_order(arm.doc_ids, arm.seed)
    ids = starting.tokenizer([the_plan.texts[d] for d in ordered])["input_ids"]
    eos = starting.tokenizer.eos_token_id
    sequences = packed_sequences(ids, eos if eos is not None else 0, config)
    arm_key = content_id("arm", the_plan.id, arm.name, arm.seed)
    start = {"reasoning_loss": base.reasoning_loss, "factual_loss": base.factual_loss}
    curve = train_arm(model, initial, sequences, config, folder, arm_key, arm.seed, start,
                      lambda: measures.curve_point(model), progress, arm.label)
    result, records = measures.full(model, arm.name, arm.kind, arm.seed, arm, curve, started)
    _save_records(folder, records)
    if config.keep_final:
        from safetensors.torch import save_model

        from curator.artifacts import atomic_file

        with atomic_file(folder / "final.safetensors") as part:
            save_model(model, str(part))
    return result


def _finished(folder: Path) -> ArmResult | None:
    """The arm's result when it finished; a checkpoint left beside it (a run stopped between writing the
    result and removing the checkpoint) is removed."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    (folder / STATE_FILE).unlink(missing_ok=True)
    return ArmResult.model_validate_json(path.read_text())


def _save_records(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "completions.json", json.dumps(records, indent=1) + "\n")


def _finish(ws: Workspace, the_plan: Plan, folder: Path, result: ArmResult) -> None:
    """The arm's result file (what a resumed run trusts), its checkpoint removed, and its catalog row. The
    row is written again at the end of every run, so a row lost here (the catalog busy) is not lost."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / RESULT_FILE, result.model_dump_json(indent=1))
    (folder / STATE_FILE).unlink(missing_ok=True)
    with Catalog.open(ws, write=True) as catalog:
        _record_results(catalog, the_plan, [result])


def _record_results(catalog: Catalog, the_plan: Plan, results: list[ArmResult]) -> None:
    for result in results:
        catalog.sql(
            "INSERT OR REPLACE INTO evaluation_results (evaluation_id, arm, kind, seed, documents, distinct_tokens, "
            "trained_tokens, reasoning_loss, factual_loss, general_ppl, accuracy, details) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [the_plan.id, result.arm, result.kind, result.seed, result.documents, result.distinct_tokens,
             result.trained_tokens, result.reasoning_loss, result.factual_loss, result.general_ppl, result.accuracy,
             json.dumps({"per_task_loss": result.per_task_loss, "per_task_accuracy": result.per_task_accuracy,
                         "curve": result.curve, "seconds": result.seconds, "per_query": result.per_query})])


def _write_plan(folder: Path, the_plan: Plan) -> None:
    """The arms' documents (Parquet) and the held-out queries and documents (JSON), for anyone checking."""
    import polars as pl

    if not (folder / "arms.parquet").is_file():
        rows = [{"arm": a.name, "seed": a.seed, "position": i, "doc_id": d}
                for a in the_plan.arms.arms for i, d in enumerate(a.doc_ids)]
        part = folder / "arms.parquet.part"
        pl.DataFrame(rows, schema={"arm": pl.String, "seed": pl.Int32, "position": pl.Int64,
                                   "doc_id": pl.Int64}).write_parquet(part)
        part.replace(folder / "arms.parquet")
    write_text_atomic(folder / "heldout.json", json.dumps({
        "queries": [q.model_dump() for q in the_plan.queries], "documents": the_plan.arms.heldout_doc_ids,
        "ranking_queries": sorted({q for r in the_plan.arms.rankings for q in r.query_ids})}, indent=1) + "\n")
    write_text_atomic(folder / "settings.json", the_plan.config.model_dump_json(indent=1))


def _record_start(ws: Workspace, the_plan: Plan) -> None:
    """The evaluation's row, and the token counts the plan made for documents the catalog had not counted
    (the random baselines draw from the whole catalog), cached as `curator score` caches its own."""
    config = the_plan.config
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("BEGIN")
        catalog.sql("INSERT OR IGNORE INTO evaluations (id, mixtures, baselines, model_id, settings, state) "
                    "VALUES (?, ?, ?, ?, ?, 'running')",
                    [the_plan.id, json.dumps(config.mixtures), json.dumps(config.baselines), the_plan.model_id,
                     config.model_dump_json()])
        store_token_counts(catalog, the_plan.tokenizer_id, the_plan.arms.new_counts)
        catalog.sql("COMMIT")


def report_data(the_plan: Plan, model_name: str, results: list[ArmResult]) -> dict:
    """The report's numbers: per arm and seed, means with intervals, paired verdicts and their sentences."""
    config = the_plan.config
    rows = [r.model_dump() for r in results]
    # Continued pretraining measures its starting model once (each seed's base row is a copy): one value,
    # no interval. From scratch every seed has its own initial weights.
    summary = stats.summarise([r for r in rows if config.from_scratch or r["arm"] != "base" or r["seed"] == 0])
    arms = {"base": {"documents": None, "trained_tokens": 0}}
    for arm in the_plan.arms.arms:
        arms.setdefault(arm.name, {"documents": len(arm.doc_ids), "trained_tokens": config.steps * config.batch_tokens,
                                   "distinct_tokens": arm.tokens})
    comparisons, sentences = [], []
    for mixture in config.mixtures:
        mine = [r for r in rows if r["arm"] == mixture]
        for other in [*config.baselines, *[m for m in config.mixtures if m != mixture], "base"]:
            theirs = [r for r in rows if r["arm"] == other]
            for metric in stats.METRICS:
                comparison = {"mixture": mixture, "against": other,
                              **stats.compare(mine, theirs, metric, config.bootstrap, config.bootstrap_seed)}
                comparisons.append(comparison)
                if metric in stats.OUTCOME_METRICS and other in config.baselines:
                    sentences.append(stats.sentence(mixture, other, comparison))
    return {
        "id": the_plan.id, "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "curator_version": __version__,
        "setup": {"model": model_name, "from_scratch": bool(config.from_scratch), "seeds": config.seeds,
                  "steps": config.steps, "batch_rows": config.batch_rows, "seq_len": config.seq_len,
                  "trained_tokens": config.steps * config.batch_tokens, "requested_tokens": config.tokens,
                  "largest_document": the_plan.arms.largest_document, "queries": len(the_plan.queries),
                  "heldout_docs": len(the_plan.arms.heldout_doc_ids), "bootstrap_resamples": config.bootstrap,
                  "settings": config.model_dump(mode="json"),
                  "rankings": [r.model_dump() for r in the_plan.arms.rankings]},
        "arms": arms, "summary": summary, "comparisons": comparisons, "sentences": sentences, "results": rows,
    }

