"""A job's or an evaluation's metadata: stored with the run as given, and as one RunMetadata row per pair, on
which a list filters (OpenAI's ``?metadata[key]=value``). The pairs are bounded by the contract
(app/contract/schemas.py Metadata) before they get here."""

from __future__ import annotations

from sqlalchemy import Select, exists, select
from sqlalchemy.orm import Session

from app.db.models import Evaluation, RunMetadata, TuningJob

Run = TuningJob | Evaluation


def keep(session: Session, run: Run, pairs: dict[str, str] | None) -> None:
    """``pairs`` on the new ``run`` (flushed, so it has its id), for it to show and for lists to filter on."""
    run.client_metadata = pairs or None
    owner = "job_id" if isinstance(run, TuningJob) else "evaluation_id"
    session.add_all(
        RunMetadata(**{owner: run.id}, key=key, value=value) for key, value in (pairs or {}).items()
    )


def matching(query: Select, table: type[Run], pairs: dict[str, str]) -> Select:
    """``query`` over ``table`` narrowed to the runs whose metadata holds every one of ``pairs``."""
    owner = RunMetadata.job_id if table is TuningJob else RunMetadata.evaluation_id
    for key, value in pairs.items():
        query = query.where(
            exists(
                select(RunMetadata.id).where(
                    owner == table.id, RunMetadata.key == key, RunMetadata.value == value
                )
            )
        )
    return query
