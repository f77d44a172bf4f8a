"""One image's migration as a pure transition function: (state, outcome, now) -> step.

The image runner (worker/run/runner.py) performs the `Command` of each `Step`, turns what
happened into that command's own `Outcome` (or `Errored`), and feeds it back. Every
decision the worker takes about an image is made here, so the whole lifecycle can be tested
table-style without a cloud, a database or a clock.

    create -> stage -> check the staged size -> import -> poll ... -> verify -> done
       |         |              |                  |        |           |
       +---------+--------------+------------------+--------+-----------+--> failed
                                (after deleting the half-made image, unless kept)

After a crash the worker starts with `inspect`: it reads the image's real status and
resumes from there, so every phase can be entered again safely. A cancelled job's image
leaves through `cancel`, which cleans up exactly as a permanent failure does.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TypeAlias, assert_never

from worker.core.changes import (
    Change,
    DataStaged,
    Failing,
    Finished,
    GlanceRecord,
    ImageCreated,
    ImageReplaced,
    ImportRequested,
    ImportRequesting,
    Noted,
    SourceHashed,
    SourceHashes,
)
from worker.core.events import Event
from worker.core.model import (
    DEFAULT_HASH_ALGO,
    ImageReport,
    Phase,
    Verification,
    next_image_id,
)
from worker.core.policy import (
    PollPolicy,
    RetryPolicy,
    decide_retry,
    import_deadline_s,
    poll_delay_s,
)
from worker.errors import (
    ChecksumMismatch,
    Conflict,
    ImageGone,
    ImportFailed,
    ImportReverted,
    ImportStalled,
    ImportTimeout,
    JobCancelled,
    MigrationError,
    NotFound,
    RetryableError,
    StageSizeMismatch,
    VirtioInjectionFailed,
)

# --- what the machine knows -----------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts(ImageReport):
    """What Glance said about an image, reduced to what decisions need."""

    disk_format: str | None = None
    es_failed_reason: str | None = None  # vendor: os_glance_es_failed_reason
    failed_import: str | None = None  # upstream: os_glance_failed_import
    import_locked: bool = False  # os_glance_import_task present
    # Multi-store clouds (comma lists, as Glance gives them): the stores holding the image's
    # data, and those the import has still to copy it to (os_glance_importing_to_stores).
    stores: str | None = None
    importing_to_stores: str | None = None

    @property
    def stores_pending(self) -> bool:
        """The import still copies the image to a store: it is not over, even when active."""
        return bool(self.importing_to_stores)


@dataclass(frozen=True)
class TaskFacts:
    """One import task of an image, as GET /v2/images/{id}/tasks reports it."""

    status: str
    request_id: str | None
    message: str | None = None
    updated_at: float | None = None  # epoch seconds, Glance's clock


@dataclass(frozen=True)
class ImageState:
    """Everything the machine needs to decide one image's next step."""

    job_id: uuid.UUID
    disk_index: int  # results.disk_index
    phase: Phase
    image_id: uuid.UUID
    size_bytes: int
    disk_format: str
    asks_for_rewrite: bool
    keep_on_failure: bool = False
    web_download: bool = False  # Glance reads the source's URL itself: nothing is staged
    # The digest the export or the manifest gives for the source's bytes: (algorithm, value).
    expected_digest: tuple[str, str] | None = None
    # False: the import to several stores succeeds when one store takes the image.
    all_stores_must_succeed: bool = True
    hash_algo: str = DEFAULT_HASH_ALGO
    source_hash: str | None = None
    verify_md5: bool = False  # also compare Glance's legacy md5 `checksum` (costs a core)
    source_md5: str | None = None
    restarts: int = 0  # times the image was staged again or made again
    image_exists: bool = False  # an image of ours may exist in Glance (cleanup needed)
    adopted: bool = False  # our create got 409: the id was there already
    conflicts: int = 0  # 409s on stage or import answered by looking at the image
    stage_conflicted: bool = False  # the last 409 was on a stage
    import_request_id: str | None = None
    import_accepted_at: float | None = None
    polls: int = 0
    expected_import_s: float | None = None  # how long this cloud's imports of this size take
    tasks_looked_at: float | None = None  # the last look at the import's tasks
    task_failure_seen: bool = False  # our task failed: the next look decides why
    failures: int = 0  # failures in a row of the current command
    first_failure_at: float | None = None  # first failure of this image: the budget's start
    last_status: str | None = None
    pending_error: MigrationError | None = None  # why we are cleaning up before failing


# --- what the machine asks for ----------------------------------------------------------------


@dataclass(frozen=True)
class CommandBase:
    """An action for the image runner, performed after `delay_s`."""

    delay_s: float = 0.0

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class CreateImage(CommandBase):
    """POST /v2/images with our chosen id."""


@dataclass(frozen=True)
class InspectImage(CommandBase):
    """GET the image to learn its real status (resume, or after an ambiguous answer)."""


@dataclass(frozen=True)
class StageData(CommandBase):
    """PUT the source file to the stage endpoint, hashing it on the way."""


@dataclass(frozen=True)
class CheckStaged(CommandBase):
    """GET the image after the stage and compare its size with ours."""


@dataclass(frozen=True)
class RequestImport(CommandBase):
    """POST the glance-direct import with our request id."""

    request_id: str = ""


@dataclass(frozen=True)
class PollImport(CommandBase):
    """GET the image (and its tasks, when asked) while the import runs."""

    with_tasks: bool = False


@dataclass(frozen=True)
class HashSource(CommandBase):
    """Hash the source file locally (the hash from an earlier run was lost)."""


@dataclass(frozen=True)
class DeleteImage(CommandBase):
    """DELETE the image: cleanup after a failure, or before making it again."""

    then_recreate: bool = False


Command: TypeAlias = (
    CreateImage
    | InspectImage
    | StageData
    | CheckStaged
    | RequestImport
    | PollImport
    | HashSource
    | DeleteImage
)


# --- what happened: each command's own outcome, or `Errored` ----------------------------------


@dataclass(frozen=True)
class Created:
    """CreateImage: Glance made the image."""

    facts: ImageFacts


@dataclass(frozen=True)
class Inspected:
    """InspectImage: the image's real status."""

    facts: ImageFacts


@dataclass(frozen=True)
class Staged:
    """StageData: the source is on Glance's staging area, hashed on the way."""

    size_bytes: int
    source_hash: str
    source_md5: str | None = None


@dataclass(frozen=True)
class StageChecked:
    """CheckStaged: the image as Glance holds it after the stage."""

    facts: ImageFacts


@dataclass(frozen=True)
class ImportAccepted:
    """RequestImport: Glance accepted the import (202)."""

    request_id: str
    expected_s: float | None = None  # the import's expected duration, when one can be told


@dataclass(frozen=True)
class Polled:
    """PollImport: the importing image (and its tasks, when asked or after an outage)."""

    facts: ImageFacts
    tasks: tuple[TaskFacts, ...] | None = None
    # (start, end), epoch seconds, of an outage of the image service since the import began.
    image_outage: tuple[float, float] | None = None
    # The same of the last outage of the identity or the image service: Glance's import task
    # calls Keystone (the limits API, say), and fails with "Internal Error" while it is down.
    cloud_outage: tuple[float, float] | None = None


@dataclass(frozen=True)
class Hashed:
    """HashSource: the source's hashes."""

    source_hash: str
    source_md5: str | None = None


@dataclass(frozen=True)
class Deleted:
    """DeleteImage: the image is gone (deleted now, or it was already)."""

    then_recreate: bool = False  # the command's: the image is to be made again


@dataclass(frozen=True)
class Errored:
    """Any command: it failed with `error`."""

    error: MigrationError


Outcome: TypeAlias = (
    Created
    | Inspected
    | Staged
    | StageChecked
    | ImportAccepted
    | Polled
    | Hashed
    | Deleted
    | Errored
)


# --- the answer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """The next command (None when the image is finished) and what to record about it."""

    state: ImageState
    command: Command | None
    event: Event | None = None  # the event to record and log
    change: Change = field(default_factory=Noted)  # what the step changes of the results row
    detail: Mapping[str, object] = field(default_factory=dict)  # the event's detail
    error: MigrationError | None = None  # the error that ended or delayed the image

    @property
    def finished(self) -> bool:
        return self.command is None


@dataclass(frozen=True)
class Policies:
    """The configured policies every decision about an image follows."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    poll: PollPolicy = field(default_factory=PollPolicy)


def begin(state: ImageState) -> Step:
    """The first step for a freshly claimed image: create it, or find out where it stands."""
    if state.phase is Phase.PENDING and not state.image_exists:
        return Step(replace(state, phase=Phase.CREATING), CreateImage(), Event.IMAGE_CREATING)
    return Step(state, InspectImage(), Event.IMAGE_RESUMED)


def cancel(state: ImageState, *, now: float) -> Step:
    """The job was cancelled: stop here and clean up as for a permanent failure."""
    # A create in flight may have landed: look for the image as if it had.
    exists = state.image_exists or state.phase is Phase.CREATING
    return _fail(replace(state, image_exists=exists), JobCancelled("job cancelled"), now)


def decide(
    state: ImageState,
    command: Command,
    outcome: Outcome,
    *,
    now: float,
    jitter: float,
    policies: Policies,
) -> Step:
    """Given the command just performed and its outcome, choose the next step.

    `command` matters only to a failure (which step to try again, or how to read a 409 or
    a 404); every other outcome is its command's own and says all that is needed.
    """
    if isinstance(outcome, Errored):
        return _on_error(state, command, outcome.error, now=now, jitter=jitter, policies=policies)
    state = replace(state, failures=0)
    match outcome:
        case Created() if state.web_download:
            # Nothing to stage: Glance is asked to download the source at once (the request id
            # is recorded with the import's acceptance; it can always be derived again).
            request_id = _request_id(state)
            state = replace(
                state, image_exists=True, phase=Phase.IMPORTING, import_request_id=request_id
            )
            command = RequestImport(request_id=request_id)
            return Step(state, command, Event.IMAGE_CREATED, ImageCreated(at=now))
        case Created():
            state = replace(state, image_exists=True, phase=Phase.STAGING)
            return Step(state, StageData(), Event.IMAGE_CREATED, ImageCreated(at=now))
        case Staged():
            return _on_staged(state, outcome, now)
        case Hashed():
            state = replace(state, source_hash=outcome.source_hash, source_md5=outcome.source_md5)
            return Step(
                state, InspectImage(), Event.IMAGE_HASHED, SourceHashed(_hashes(state, outcome))
            )
        case ImportAccepted():
            return _on_import_accepted(state, outcome, now, jitter, policies.poll)
        case StageChecked(facts=facts):
            state = _seen(state, facts)
            return _check_staged(state, facts, now=now, jitter=jitter, policy=policies.poll)
        case Polled(facts=facts):
            return _poll(_seen(state, facts), outcome, now=now, jitter=jitter, policy=policies.poll)
        case Inspected(facts=facts):
            return _resume(_seen(state, facts), facts, now=now, jitter=jitter, policy=policies.poll)
        case Deleted(then_recreate=True):
            return _replace_image(state)
        case Deleted():
            return _cleaned_up(state, now)
        case _:
            assert_never(outcome)


# --- transitions ------------------------------------------------------------------------------


def _on_staged(state: ImageState, outcome: Staged, now: float) -> Step:
    state = replace(
        state,
        source_hash=outcome.source_hash,
        source_md5=outcome.source_md5,
        stage_conflicted=False,
    )
    change = DataStaged(bytes_staged=outcome.size_bytes, at=now, hashes=_hashes(state, outcome))
    return Step(state, CheckStaged(), Event.IMAGE_STAGED, change)


def _hashes(state: ImageState, outcome: Staged | Hashed) -> SourceHashes:
    return SourceHashes(state.hash_algo, outcome.source_hash, outcome.source_md5)


def _request_id(state: ImageState) -> str:
    return f"req-{uuid.uuid5(state.image_id, 'import')}"


def _import(state: ImageState) -> Step:
    request_id = _request_id(state)
    state = replace(state, phase=Phase.IMPORTING, import_request_id=request_id)
    return Step(
        state,
        RequestImport(request_id=request_id),
        Event.IMAGE_IMPORT_REQUESTING,
        ImportRequesting(request_id),
    )


def _on_import_accepted(
    state: ImageState, outcome: ImportAccepted, now: float, jitter: float, poll: PollPolicy
) -> Step:
    state = replace(
        state,
        import_accepted_at=now,
        polls=0,
        expected_import_s=outcome.expected_s,
        tasks_looked_at=None,
        task_failure_seen=False,
    )
    delay_s = poll_delay_s(0, policy=poll, jitter=jitter, expected_s=outcome.expected_s)
    change = ImportRequested(outcome.request_id, at=now)
    return Step(state, PollImport(delay_s=delay_s), Event.IMAGE_IMPORT_REQUESTED, change)


def _seen(state: ImageState, facts: ImageFacts) -> ImageState:
    """Glance answered about the image: it exists, with this status."""
    return replace(state, image_exists=True, last_status=facts.status)


def _check_staged(
    state: ImageState, facts: ImageFacts, *, now: float, jitter: float, policy: PollPolicy
) -> Step:
    if facts.status == "queued":
        # The stage did not stick (Glance restores `queued` on a broken upload): send it again.
        return _restart(state, StageData(), Event.IMAGE_STAGE_LOST, "staged data was not kept", now)
    if facts.status == "uploading" and facts.size != state.size_bytes:
        error = StageSizeMismatch(
            f"Glance staged {facts.size} bytes, the source has {state.size_bytes}"
        )
        return _fail(state, error, now)
    if facts.status == "uploading":
        return _import(state)
    return _resume(state, facts, now=now, jitter=jitter, policy=policy)


def _resume(
    state: ImageState, facts: ImageFacts, *, now: float, jitter: float, policy: PollPolicy
) -> Step:
    """Act on the real status of an image found after a crash or an ambiguous answer."""
    status = facts.status
    if status == "queued" and state.stage_conflicted:
        # Queued, yet the stage was refused: stale data sits on staging (409 Duplicate).
        return _recreate(state, "staged data of an earlier attempt is in the way", now)
    if status == "queued" and state.web_download:
        return _import(state)  # Glance restores `queued` when its download fails
    if status == "queued":
        return Step(replace(state, phase=Phase.STAGING), StageData(), Event.IMAGE_RESUMED_QUEUED)
    if status == "uploading" and facts.import_locked:
        # Our import was accepted but its answer was lost: the task holds the lock.
        return _resume_polling(state, now, jitter, policy)
    if status == "uploading":
        if facts.size == state.size_bytes:
            return _import(state)
        reason = f"staged {facts.size} bytes, expected {state.size_bytes}"
        return _recreate(state, reason, now)
    if status == "importing":
        failure = _import_failure(facts, None, state)
        if failure is not None and state.phase in (Phase.IMPORTING, Phase.VERIFYING):
            return _fail(state, failure, now, glance=_failure_record(facts))  # our import's outcome
        if failure is not None:
            return _recreate(state, failure.message, now)
        return _resume_polling(state, now, jitter, policy)
    if status == "active" and facts.stores_pending:
        return _resume_polling(state, now, jitter, policy)
    if status == "active":
        return _verify(state, facts, now)
    return _recreate(state, f"image is {status}", now)


def _resume_polling(state: ImageState, now: float, jitter: float, policy: PollPolicy) -> Step:
    state = replace(
        state,
        phase=Phase.IMPORTING,
        import_request_id=state.import_request_id or _request_id(state),
        import_accepted_at=state.import_accepted_at or now,
    )
    return Step(
        state,
        PollImport(delay_s=poll_delay_s(0, policy=policy, jitter=jitter)),
        Event.IMAGE_RESUMED_IMPORTING,
    )


def _poll(
    state: ImageState, outcome: Polled, *, now: float, jitter: float, policy: PollPolicy
) -> Step:
    facts = outcome.facts
    if facts.status == "active" and not facts.stores_pending:
        return _verify(state, facts, now)
    failure = _import_failure(facts, None, state)
    if failure is None:
        failure = _task_failure(outcome.tasks, state)
        if failure is not None and not state.task_failure_seen:
            # The image was read before the tasks: the signal saying why (the vendor's
            # reason, a failed store) may have landed between. Read the image once more.
            state = replace(state, task_failure_seen=True)
            return Step(state, PollImport(delay_s=policy.dense_s, with_tasks=True))
    if failure is None:
        lost = _import_lost(state, outcome, now, policy)
        if lost is not None:
            return _recreate(state, lost, now)  # Glance never takes a second import
        failure = _import_overdue(state, facts, now, policy)
    if isinstance(failure, ImportFailed) and outcome.cloud_outage is not None:
        # An outage says nothing about this disk: import it again (bounded by the restarts).
        reason = f"{failure.message}, across an outage of the cloud"
        return _recreate(state, reason, now)
    if failure is not None:
        return _fail(state, failure, now, glance=_failure_record(facts))
    polls = state.polls + 1
    started = state.import_accepted_at if state.import_accepted_at is not None else now
    tasks_due = now - (state.tasks_looked_at or started) >= policy.tasks_every_s
    with_tasks = facts.status == "importing" and (tasks_due or not facts.import_locked)
    state = replace(
        state, polls=polls, tasks_looked_at=now if with_tasks else state.tasks_looked_at
    )
    delay_s = poll_delay_s(
        polls,
        policy=policy,
        jitter=jitter,
        waited_s=now - started,
        expected_s=state.expected_import_s,
    )
    return Step(state, PollImport(delay_s=delay_s, with_tasks=with_tasks))


def _import_failure(
    facts: ImageFacts, tasks: tuple[TaskFacts, ...] | None, state: ImageState
) -> MigrationError | None:
    """Recognise every terminal failure of an import, not just success (semantics 1.9)."""
    if facts.status in ("killed", "deleted", "pending_delete"):
        return ImageGone(f"image became {facts.status} during the import")
    if facts.status == "queued" and state.web_download and facts.import_locked:
        return None  # a web-download stays `queued` until its task starts downloading
    if facts.status == "queued" and state.import_accepted_at is not None:
        failed = (
            f" (import failed for store(s): {facts.failed_import})" if facts.failed_import else ""
        )
        return ImportReverted(f"image dropped back to queued after the import was accepted{failed}")
    if facts.status != "importing":
        return None
    if facts.es_failed_reason:
        return VirtioInjectionFailed(f"os_glance_es_failed_reason: {facts.es_failed_reason}")
    if facts.failed_import and facts.stores_pending and not state.all_stores_must_succeed:
        return None  # the stores still to do may take the image: that is success enough
    if facts.failed_import:
        return ImportFailed(f"import failed for store(s): {facts.failed_import}")
    return _task_failure(tasks, state)


def _task_failure(tasks: tuple[TaskFacts, ...] | None, state: ImageState) -> ImportFailed | None:
    for task in tasks or ():
        if task.status == "failure" and task.request_id == state.import_request_id:
            return ImportFailed(f"import task failed: {task.message or 'no message'}")
    return None


def _import_lost(state: ImageState, outcome: Polled, now: float, policy: PollPolicy) -> str | None:
    """Our import task froze across an outage of the image service: its API process died.

    A task still `pending` leaves the image `uploading` (locked), one `processing` leaves
    it `importing`; either stays so for good. Without the outage's window (this process
    began after it) only a `processing` task's age tells: Glance touches it every minute
    while it copies. A `pending` one may just be queued behind Glance's import threads.
    """
    if outcome.facts.status not in ("uploading", "importing"):
        return None
    ours = [
        task
        for task in outcome.tasks or ()
        if task.request_id == state.import_request_id and task.status in ("pending", "processing")
    ]
    if not ours or any(task.updated_at is None for task in ours):
        return None
    touched_at = max(task.updated_at for task in ours if task.updated_at is not None)
    if outcome.image_outage is not None:
        started, ended = outcome.image_outage
        if now - ended >= policy.lost_import_s and touched_at < started:
            return (
                f"import task still {ours[-1].status} and unchanged since before the image "
                f"service's outage, {now - ended:.0f} s after it ended: the import was lost"
            )
        return None
    stale_s = policy.stale_task_s + state.size_bytes / policy.stale_rate_bytes_per_s
    if all(task.status == "processing" for task in ours) and now - touched_at > stale_s:
        return (
            f"import task still {ours[-1].status} and untouched for {now - touched_at:.0f} s "
            f"(more than {stale_s:.0f} s for a disk of this size): the import was lost"
        )
    return None


def _import_overdue(
    state: ImageState, facts: ImageFacts, now: float, policy: PollPolicy
) -> MigrationError | None:
    started = state.import_accepted_at if state.import_accepted_at is not None else now
    waited_s = now - started
    if facts.status == "uploading" and waited_s > policy.stall_s:
        return ImportStalled(f"still uploading {waited_s:.0f} s after the import was accepted")
    deadline_s = import_deadline_s(state.size_bytes, policy=policy)
    if waited_s > deadline_s:
        return ImportTimeout(
            f"import not finished after {waited_s:.0f} s "
            f"(deadline {deadline_s:.0f} s, status {facts.status})"
        )
    return None


def _verify(state: ImageState, facts: ImageFacts, now: float) -> Step:
    state = replace(state, phase=Phase.VERIFYING)
    if state.web_download and state.source_hash is None:
        return _verify_download(state, facts, now)
    if state.source_hash is None or (state.verify_md5 and state.source_md5 is None):
        return Step(state, HashSource(), Event.IMAGE_VERIFYING)
    glance = _glance_record(facts)
    verification, mismatch = _compare(state, facts)
    if mismatch is not None:
        error = ChecksumMismatch(mismatch)
        return _fail(state, error, now, verification=Verification.MISMATCH, glance=glance)
    done = replace(state, phase=Phase.DONE)
    change = Finished(Phase.DONE, at=now, verification=verification, glance=glance)
    # Done, although some stores failed (all_stores_must_succeed false): say which.
    detail = {"failed_stores": list(glance.failed_stores)} if glance.failed_stores else {}
    return Step(done, None, Event.IMAGE_FINISHED, change, detail=detail)


def _verify_download(state: ImageState, facts: ImageFacts, now: float) -> Step:
    """What Glance downloaded, checked without reading the source where that suffices: the
    size, and the digest given for the source when Glance hashed in its algorithm. A digest
    in another algorithm makes the worker hash the source itself; without one, the bytes are
    not checked."""
    glance = _glance_record(facts)
    rewritten = state.asks_for_rewrite or facts.disk_format != state.disk_format
    if not rewritten and facts.size is not None and facts.size != state.size_bytes:
        error = ChecksumMismatch(
            f"Glance downloaded {facts.size} bytes, the source had {state.size_bytes} when it "
            "was inspected"
        )
        return _fail(state, error, now, verification=Verification.MISMATCH, glance=glance)
    verification = Verification.NOT_CHECKED
    if state.expected_digest is not None:
        algorithm, value = state.expected_digest
        if algorithm != facts.os_hash_algo or not facts.os_hash_value:
            return Step(state, HashSource(), Event.IMAGE_VERIFYING)
        if facts.os_hash_value == value:
            verification = Verification.VERIFIED
        elif rewritten:
            verification = Verification.TRANSFORMED
        else:
            error = ChecksumMismatch(
                f"Glance {algorithm} {facts.os_hash_value} differs from the source's {value}"
            )
            return _fail(state, error, now, verification=Verification.MISMATCH, glance=glance)
    done = replace(state, phase=Phase.DONE)
    change = Finished(Phase.DONE, at=now, verification=verification, glance=glance)
    return Step(done, None, Event.IMAGE_FINISHED, change)


def _compare(state: ImageState, facts: ImageFacts) -> tuple[Verification, str | None]:
    """Our hashes against Glance's: the verdict, and what differs when nothing explains it."""
    rewritten = state.asks_for_rewrite or facts.disk_format != state.disk_format
    pairs = []
    if facts.os_hash_algo == state.hash_algo and facts.os_hash_value:
        pairs.append((state.hash_algo, state.source_hash, facts.os_hash_value))
    if state.verify_md5 and facts.checksum:
        pairs.append(("md5", state.source_md5, facts.checksum))
    if not pairs:
        return Verification.NOT_CHECKED, None
    different = [(algo, ours, theirs) for algo, ours, theirs in pairs if ours != theirs]
    if not different:
        return Verification.VERIFIED, None
    if rewritten:
        return Verification.TRANSFORMED, None
    algo, ours, theirs = different[0]
    return Verification.MISMATCH, f"Glance {algo} {theirs} differs from the source's {ours}"


def _glance_record(facts: ImageFacts) -> GlanceRecord:
    """All that Glance reports of the image worth recording: its data, and where it went."""
    reported = {f.name: getattr(facts, f.name) for f in fields(ImageReport)}
    return replace(_failure_record(facts), **reported)


def _failure_record(facts: ImageFacts) -> GlanceRecord:
    """What a failed import leaves worth recording: the status, and where the data went."""
    if facts.stores is None and facts.failed_import is None:
        return GlanceRecord(facts.status)  # a single-store cloud names no store
    return GlanceRecord(
        facts.status,
        stores=_store_names(facts.stores),
        failed_stores=_store_names(facts.failed_import),
    )


def _store_names(listed: str | None) -> tuple[str, ...]:
    """Glance's comma list of store ids as a tuple (None or "": none)."""
    return tuple(name.strip() for name in (listed or "").split(",") if name.strip())


def _restart(state: ImageState, command: Command, event: Event, reason: str, now: float) -> Step:
    """Go back to an earlier step, a bounded number of times."""
    restarts = state.restarts + 1
    if restarts > _MAX_RESTARTS:
        error = ImportFailed(f"gave up after {_MAX_RESTARTS} restarts; last: {reason}")
        return _fail(state, error, now)
    state = replace(
        state,
        restarts=restarts,
        phase=Phase.STAGING if isinstance(command, StageData) else state.phase,
    )
    return Step(state, command, event, detail={"reason": reason})


_MAX_RESTARTS = 3


def _recreate(state: ImageState, reason: str, now: float) -> Step:
    """The image cannot be continued (Glance never accepts a second import): replace it."""
    return _restart(state, DeleteImage(then_recreate=True), Event.IMAGE_RECREATING, reason, now)


def _replace_image(state: ImageState) -> Step:
    """The image is gone (deleted to be made again, or vanished): make it under a new id."""
    fresh = replace(
        state,
        phase=Phase.CREATING,
        image_id=next_image_id(state.image_id),
        image_exists=False,
        adopted=False,
        stage_conflicted=False,
        import_request_id=None,
        import_accepted_at=None,
        polls=0,
    )
    # The new id is stored before it is used; the old image's progress is cleared.
    return Step(fresh, CreateImage(), Event.IMAGE_CREATING, ImageReplaced(fresh.image_id))


def _cleaned_up(state: ImageState, now: float) -> Step:
    """The failed image's deletion is done: the row fails with the error that ended it."""
    state = replace(state, image_exists=False)
    return _finish_failed(state, now, cleanup="deleted", error=state.pending_error)


def _on_error(
    state: ImageState,
    command: Command,
    error: MigrationError,
    *,
    now: float,
    jitter: float,
    policies: Policies,
) -> Step:
    ambiguous = _ambiguous_answer(state, command, error, now)
    if ambiguous is not None:
        return ambiguous
    failures = state.failures + 1
    first = state.first_failure_at if state.first_failure_at is not None else now
    decision = decide_retry(
        error, failures=failures, elapsed_s=now - first, policy=policies.retry, jitter=jitter
    )
    if not decision.retry:
        if isinstance(command, DeleteImage):
            # Cleanup itself failed. Glance out of reach: the deletion is owed, and a worker
            # does it once Glance answers. Refused for good: the image is kept for the operator.
            cleanup = "owed" if isinstance(error, RetryableError) else "kept"
            return _finish_failed(state, now, cleanup=cleanup, error=state.pending_error or error)
        return _fail(state, error, now)
    state = replace(state, failures=failures, first_failure_at=first)
    retry = replace(command, delay_s=decision.delay_s)
    return Step(
        state,
        retry,
        Event.IMAGE_RETRY_SCHEDULED,
        detail={
            "reason": decision.reason,
            "delay_s": round(decision.delay_s, 3),
            "step": command.name,
        },
        error=error,
    )


def _ambiguous_answer(
    state: ImageState, command: Command, error: MigrationError, now: float
) -> Step | None:
    """Answers that mean 'look before you go on' rather than 'failed'."""
    match command:
        case CreateImage():
            if isinstance(error, Conflict):
                # Our id already exists: an earlier attempt made it. Adopt it.
                adopted = replace(state, image_exists=True, adopted=True)
                return Step(adopted, InspectImage(), Event.IMAGE_ADOPTING)
        case StageData() | RequestImport():
            if isinstance(error, Conflict):
                return _on_conflict(state, command, error, now)
        case DeleteImage():
            if isinstance(error, NotFound):  # gone already: as good as deleted
                return _replace_image(state) if command.then_recreate else _cleaned_up(state, now)
        case InspectImage() | CheckStaged() | PollImport():
            if isinstance(error, NotFound):
                return _on_missing(state, now)
        case HashSource():
            pass
        case _:
            assert_never(command)
    return None


_MAX_CONFLICTS = 5


def _on_conflict(
    state: ImageState, command: StageData | RequestImport, error: Conflict, now: float
) -> Step:
    """Stage or import already happened (response lost) or the image moved on: look first."""
    conflicts = state.conflicts + 1
    if conflicts > _MAX_CONFLICTS:
        return _fail(state, error, now)
    state = replace(state, conflicts=conflicts, stage_conflicted=isinstance(command, StageData))
    detail = {"reason": error.message}
    return Step(state, InspectImage(), Event.IMAGE_CONFLICT_INSPECTING, detail=detail)


def _on_missing(state: ImageState, now: float) -> Step:
    """Our image id is unknown to Glance."""
    if state.import_accepted_at is not None:
        gone = replace(state, image_exists=False)
        return _fail(gone, ImageGone("image disappeared during the import"), now)
    if state.phase is Phase.CREATING and not state.adopted:
        # The create never landed (or is still on its way): the same id keeps it idempotent.
        state = replace(state, image_exists=False)
        detail = {"reason": "image not found"}
        return Step(state, CreateImage(), Event.IMAGE_CREATING, detail=detail)
    # It existed and is gone; Glance never takes a deleted id again: make a new one.
    return _replace_image(state)


def _fail(
    state: ImageState,
    error: MigrationError,
    now: float,
    *,
    verification: Verification | None = None,
    glance: GlanceRecord | None = None,
) -> Step:
    """A permanent failure: delete the half-made image first, unless asked to keep it.

    `verification` and `glance` are what the comparison with Glance found, when it ran.
    """
    if state.image_exists and not state.keep_on_failure:
        state = replace(state, pending_error=error)
        change = Failing(error.code, error.message, verification=verification, glance=glance)
        return Step(state, DeleteImage(), Event.IMAGE_FAILING, change, error=error)
    cleanup = "kept" if state.image_exists else None
    return _finish_failed(
        state, now, cleanup=cleanup, error=error, verification=verification, glance=glance
    )


def _finish_failed(
    state: ImageState,
    now: float,
    *,
    cleanup: str | None,
    error: MigrationError | None = None,
    verification: Verification | None = None,
    glance: GlanceRecord | None = None,
) -> Step:
    change = Finished(
        Phase.FAILED,
        at=now,
        error_code=error.code if error is not None else None,
        error_message=error.message if error is not None else None,
        cleanup=cleanup,
        verification=verification,
        glance=glance,
    )
    return Step(replace(state, phase=Phase.FAILED), None, Event.IMAGE_FINISHED, change, error=error)
