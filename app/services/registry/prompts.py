"""The prompt registry: tasks and their immutable, numbered versions."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, joinedload, undefer

from app.contract.kinds import Method
from app.contract.templates import INPUT_PLACEHOLDER
from app.db.models import PromptVersion, Task, TuningJob, utcnow
from app.errors import InvalidRequest, NotFound
from app.services.pagination import paginate

# "sentiment" (newest version) or "sentiment@3" (pinned).
TASK_REF = re.compile(r"(?P<task>[a-z0-9][a-z0-9_-]{0,63})(?:@(?P<version>[1-9][0-9]{0,8}))?")


TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_task_name(name: str) -> str:
    """A new task's name, as a job or an import gives it: 422 naming ``task`` when it is not one."""
    if not TASK_NAME.fullmatch(name):
        raise InvalidRequest(
            f"Task name {name!r} is not valid: use 1-64 characters of a-z, 0-9, '_' and '-', starting with a "
            "letter or digit.",
            param="task",
        )
    return name


def check_template(template: str, *, max_chars: int) -> str:
    """A template a version can hold: ``{input}`` exactly once, at most ``max_chars`` characters (jobs and
    imports alike; SOFTPROMPT_MAX_TEMPLATE_CHARS)."""
    if len(template) > max_chars:
        raise InvalidRequest(
            f"template is {len(template)} characters; the limit is {max_chars} "
            "(SOFTPROMPT_MAX_TEMPLATE_CHARS).",
            param="template",
            code="too_long",
        )
    if template.count(INPUT_PLACEHOLDER) != 1:
        raise InvalidRequest(f"template must contain {INPUT_PLACEHOLDER} exactly once.", param="template")
    return template


def parse_task_ref(ref: str) -> tuple[str, int | None]:
    match = TASK_REF.fullmatch(ref)
    if match is None:
        raise InvalidRequest(
            f"task {ref!r} is not a task name or name@version (for example 'sentiment' or 'sentiment@3').",
            param="task",
        )
    version = match["version"]
    return match["task"], int(version) if version else None


def publish_version(
    session: Session,
    *,
    job: TuningJob,
    vectors: bytes,
    embedding_dim: int,
    kind: str,
    labels: list[str] | None,
    metrics: dict[str, Any],
) -> PromptVersion:
    """Adds the job's version. The caller commits it together with the job's success, and the unique key
    on source_job_id makes a second write for the same job fail instead of adding a duplicate."""
    return add_version(
        session,
        tenant_id=job.tenant_id,
        name=job.task,
        vectors=vectors,
        base_model=job.base_model,
        method=job.method,
        num_virtual_tokens=job.num_virtual_tokens,
        embedding_dim=embedding_dim,
        template=job.template,
        labels=labels,
        kind=kind,
        metrics=metrics,
        source_job_id=job.id,
        source_dataset_id=job.training_dataset_id,
        parent=job.init.get("from"),
    )


def add_version(
    session: Session,
    *,
    tenant_id: int,
    name: str,
    vectors: bytes,
    base_model: str,
    num_virtual_tokens: int,
    embedding_dim: int,
    template: str,
    labels: list[str] | None,
    kind: str,
    metrics: dict[str, Any],
    method: str = Method.PROMPT,
    source_job_id: int | None = None,
    source_dataset_id: int | None = None,
    parent: str | None = None,
    upload_bytes: int | None = None,
) -> PromptVersion:
    """The task's next version (the task made if it is new), from a job or an imported adapter (of
    ``upload_bytes``)."""
    task_id, number = _next_version_number(session, tenant_id=tenant_id, name=name)
    version = PromptVersion(
        task_id=task_id,
        version=number,
        base_model=base_model,
        num_virtual_tokens=num_virtual_tokens,
        embedding_dim=embedding_dim,
        method=method,
        template=template,
        labels=labels,
        kind=kind,
        vectors=vectors,
        sha256=hashlib.sha256(vectors).hexdigest(),
        source_job_id=source_job_id,
        source_dataset_id=source_dataset_id,
        parent=parent,
        metrics=metrics,
        upload_bytes=upload_bytes,
    )
    session.add(version)
    session.flush()
    return version


def _next_version_number(session: Session, *, tenant_id: int, name: str) -> tuple[int, int]:
    """(task id, the new version's number), the task created if it is new. Both are single statements that
    write first, so two workers finishing jobs of one task at once queue on the row (SQLite's write lock,
    PostgreSQL's row lock) instead of both reading the same last number."""
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
    session.execute(
        insert(Task)
        .values(tenant_id=tenant_id, name=name, last_version=0, created_at=utcnow())
        .on_conflict_do_nothing()
    )
    bumped = session.execute(
        update(Task)
        .where(Task.tenant_id == tenant_id, Task.name == name)
        .values(last_version=Task.last_version + 1)
        .returning(Task.id, Task.last_version)
    ).one()
    return bumped.id, bumped.last_version


def list_tasks(session: Session, *, tenant_id: int, limit: int, after: int | None) -> tuple[list[Task], bool]:
    query = select(Task).where(Task.tenant_id == tenant_id)
    return paginate(session, query, id_column=Task.id, limit=limit, after=after)


def newest_versions(session: Session, *, task: Task, limit: int) -> tuple[list[PromptVersion], int]:
    """A task's newest ``limit`` versions, oldest of them first, and how many it has in all: what a task
    shows of its versions, bounded however many it has."""
    newest = session.scalars(
        select(PromptVersion)
        .where(PromptVersion.task_id == task.id)
        .order_by(PromptVersion.version.desc())
        .limit(limit)
    ).all()
    count = session.scalar(select(func.count()).where(PromptVersion.task_id == task.id))
    return list(reversed(newest)), int(count or 0)


def list_task_versions(
    session: Session, *, tenant_id: int, name: str, limit: int, after: int | None
) -> tuple[list[PromptVersion], bool]:
    """A page of a task's versions, newest first; ``after`` is the last version number of the page before."""
    task = get_task(session, tenant_id=tenant_id, name=name)
    query = select(PromptVersion).where(PromptVersion.task_id == task.id)
    if after is not None:
        query = query.where(PromptVersion.version < after)
    rows = list(session.scalars(query.order_by(PromptVersion.version.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_versions(
    session: Session, *, tenant_id: int, limit: int, after: PromptVersion | None
) -> tuple[list[PromptVersion], bool]:
    """A page of the tenant's versions of every task, newest first; ``after``: the page before's last.

    The page's ids first, then its rows: sorting whole rows read every version's columns, and on SQLite
    each row's columns past its vectors sit behind the vectors' overflow pages (1.2 s for a page of 100
    out of 10,000 versions; the ids alone are a few milliseconds)."""
    query = select(PromptVersion.id).join(Task).where(Task.tenant_id == tenant_id)
    if after is not None:
        query = query.where(PromptVersion.id < after.id)
    ids = list(session.scalars(query.order_by(PromptVersion.id.desc()).limit(limit + 1)))
    rows = session.scalars(
        select(PromptVersion)
        .where(PromptVersion.id.in_(ids[:limit]))
        .options(joinedload(PromptVersion.task))
        .order_by(PromptVersion.id.desc())
    )
    return list(rows), len(ids) > limit


def get_task(session: Session, *, tenant_id: int, name: str) -> Task:
    """Names are looked up among the tenant's own tasks: another tenant's is simply not there."""
    task = session.scalars(select(Task).where(Task.tenant_id == tenant_id, Task.name == name)).first()
    if task is None:
        raise NotFound(f"No task named {name!r}.", param="task")
    return task


def get_version(
    session: Session, *, tenant_id: int, name: str, version: int | None, with_vectors: bool = False
) -> PromptVersion:
    """The pinned version, or the newest one when ``version`` is None."""
    query = select(PromptVersion).join(Task).where(Task.tenant_id == tenant_id, Task.name == name)
    if with_vectors:
        query = query.options(undefer(PromptVersion.vectors))
    if version is None:
        found = session.scalars(query.order_by(PromptVersion.version.desc()).limit(1)).first()
    else:
        found = session.scalars(query.where(PromptVersion.version == version)).first()
    if found is None:
        get_task(session, tenant_id=tenant_id, name=name)
        which = "any version" if version is None else f"version {version}"
        raise NotFound(f"Task {name!r} has no {which}.", param="task")
    return found


def registry_mark(session: Session) -> tuple[int, int, int]:
    """A value that changes whenever any tenant's set of versions does, read in one small query: a new
    version raises a task's ``last_version`` (it never falls), a deleted one lowers the count of versions.
    Tasks are never deleted. A server that caches what names resolve to keeps them while this is unchanged."""
    tasks = select(func.count(), func.coalesce(func.sum(Task.last_version), 0)).select_from(Task)
    task_count, numbered = session.execute(tasks).one()
    versions = session.scalar(select(func.count()).select_from(PromptVersion)) or 0
    return int(task_count), int(numbered), int(versions)


def find_version(session: Session, *, tenant_id: int, ref: str, with_vectors: bool = True) -> PromptVersion:
    name, version = parse_task_ref(ref)
    return get_version(session, tenant_id=tenant_id, name=name, version=version, with_vectors=with_vectors)


def delete_version(session: Session, *, tenant_id: int, name: str, version: int) -> int:
    """How many versions the task has left."""
    found = get_version(session, tenant_id=tenant_id, name=name, version=version, with_vectors=False)
    session.delete(found)
    session.flush()
    return session.scalar(select(func.count()).where(PromptVersion.task_id == found.task_id)) or 0
