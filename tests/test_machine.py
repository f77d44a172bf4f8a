"""The per-image state machine, driven table-style with no cloud, database or clock."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from worker.core.changes import (
    DataStaged,
    Failing,
    Finished,
    GlanceRecord,
    ImageCreated,
    ImageReplaced,
    ImportRequested,
    ImportRequesting,
    SourceHashed,
    SourceHashes,
)
from worker.core.events import Event
from worker.core.machine import (
    CheckStaged,
    Command,
    Created,
    CreateImage,
    Deleted,
    DeleteImage,
    Errored,
    Hashed,
    HashSource,
    ImageFacts,
    ImageState,
    ImportAccepted,
    Inspected,
    InspectImage,
    Outcome,
    Policies,
    Polled,
    PollImport,
    RequestImport,
    StageChecked,
    Staged,
    StageData,
    Step,
    TaskFacts,
    begin,
    cancel,
    decide,
)
from worker.core.model import Phase, Verification, image_id_for, next_image_id
from worker.core.policy import PollPolicy, RetryPolicy
from worker.errors import (
    CloudUnavailable,
    Conflict,
    ConnectionFailed,
    MigrationError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    SourceError,
)

JOB = uuid.UUID("00000000-0000-0000-0000-000000000001")
SIZE = 10_000
HASH = "a" * 128


def fresh(**changes: object) -> ImageState:
    state = ImageState(
        job_id=JOB,
        disk_index=3,
        phase=Phase.PENDING,
        image_id=image_id_for(JOB, 3),
        size_bytes=SIZE,
        disk_format="vmdk",
        asks_for_rewrite=False,
    )
    return replace(state, **changes)  # type: ignore[arg-type]


def step(state: ImageState, command: Command, outcome: Outcome, now: float = 100.0) -> Step:
    return decide(state, command, outcome, now=now, jitter=0.5, policies=Policies())


def written(result: Step) -> Failing | Finished:
    """The change of a step that ends the image, or that cleans it up before it fails."""
    assert isinstance(result.change, Failing | Finished), result.change
    return result.change


def finished(result: Step) -> Finished:
    assert isinstance(result.change, Finished), result.change
    return result.change


def facts(status: str, **changes: object) -> ImageFacts:
    return replace(ImageFacts(status=status), **changes)  # type: ignore[arg-type]


ACTIVE = facts("active", size=SIZE, os_hash_algo="sha512", os_hash_value=HASH, disk_format="vmdk")


def run_happy_path() -> list[Step]:
    """create -> stage -> check -> import -> poll (importing) -> poll (active) -> done."""
    steps = [begin(fresh())]
    script: list[Outcome] = [
        Created(facts("queued")),
        Staged(SIZE, HASH),
        StageChecked(facts("uploading", size=SIZE)),
        ImportAccepted("req-x"),
        Polled(facts("importing", import_locked=True)),
        Polled(ACTIVE),
    ]
    for outcome in script:
        current = steps[-1]
        assert current.command is not None
        steps.append(step(current.state, current.command, outcome))
    return steps


def test_happy_path_goes_through_every_phase_and_ends_verified() -> None:
    steps = run_happy_path()
    assert [type(s.command).__name__ for s in steps] == [
        "CreateImage",
        "StageData",
        "CheckStaged",
        "RequestImport",
        "PollImport",
        "PollImport",
        "NoneType",
    ]
    assert [s.state.phase for s in steps] == [
        Phase.CREATING,
        Phase.STAGING,
        Phase.STAGING,
        Phase.IMPORTING,
        Phase.IMPORTING,
        Phase.IMPORTING,
        Phase.DONE,
    ]
    final = steps[-1]
    assert final.finished
    assert finished(final).verification == Verification.VERIFIED
    assert finished(final).glance == GlanceRecord(
        "active", size=SIZE, os_hash_algo="sha512", os_hash_value=HASH
    )
    assert steps[1].change == ImageCreated(at=100.0)
    assert steps[2].change == DataStaged(SIZE, 100.0, SourceHashes("sha512", HASH))
    assert steps[3].change == ImportRequesting(steps[3].state.import_request_id or "")
    assert steps[4].change == ImportRequested("req-x", at=100.0)


def test_import_request_id_is_ours_and_stable() -> None:
    steps = run_happy_path()
    request = steps[3].command
    assert isinstance(request, RequestImport)
    assert request.request_id.startswith("req-")
    assert request.request_id == run_happy_path()[3].command.request_id  # type: ignore[union-attr]


def importing_state(**changes: object) -> ImageState:
    return fresh(
        phase=Phase.IMPORTING,
        image_exists=True,
        source_hash=HASH,
        import_request_id="req-ours",
        import_accepted_at=100.0,
        **changes,
    )


@pytest.mark.parametrize(
    ("observed", "tasks", "code"),
    [
        # The vendor's signal: stays importing with os_glance_es_failed_reason.
        (facts("importing", es_failed_reason="virtio error"), None, "virtio_failed"),
        # Upstream: stays importing, os_glance_failed_import set.
        (facts("importing", failed_import="fs"), None, "import_failed"),
        # Upstream without that property: our task (matched by request id) failed.
        (
            facts("importing"),
            (TaskFacts("failure", "req-ours", "Internal Error"),),
            "import_failed",
        ),
        # Conversion-plugin clouds drop the image back to queued.
        (facts("queued"), None, "import_reverted"),
        (facts("killed"), None, "image_gone"),
        (facts("deleted"), None, "image_gone"),
    ],
)
def test_every_terminal_failure_signal_is_recognised(
    observed: ImageFacts, tasks: tuple[TaskFacts, ...] | None, code: str
) -> None:
    result = step(importing_state(), PollImport(), Polled(observed, tasks))
    if tasks is not None:
        # A failed task alone is read again with the image, which may say why by then.
        assert isinstance(result.command, PollImport)
        assert result.command.with_tasks
        result = step(result.state, result.command, Polled(observed, tasks))
    # The half-made image is deleted first, then the row fails with the signal's code.
    assert isinstance(result.command, DeleteImage)
    assert written(result).error_code == code
    final = step(result.state, result.command, Deleted())
    assert final.finished
    assert final.state.phase is Phase.FAILED
    assert finished(final).cleanup == "deleted"
    assert final.error is not None
    assert final.error.code == code


def test_a_failed_task_of_someone_else_is_not_ours() -> None:
    other = (TaskFacts("failure", "req-other"),)
    result = step(importing_state(), PollImport(), Polled(facts("importing"), other))
    assert isinstance(result.command, PollImport)


def test_keep_on_failure_keeps_the_image_and_says_so() -> None:
    state = importing_state(keep_on_failure=True)
    result = step(state, PollImport(), Polled(facts("importing", failed_import="fs")))
    assert result.finished
    assert result.state.phase is Phase.FAILED
    assert finished(result).cleanup == "kept"


def test_import_that_never_ends_times_out_on_a_size_scaled_deadline() -> None:
    policy = PollPolicy(deadline_base_s=60.0, deadline_rate_bytes_per_s=1000.0)
    state = importing_state()
    deadline = 60.0 + SIZE / 1000.0
    still = decide(
        state,
        PollImport(),
        Polled(facts("importing", import_locked=True)),
        now=100.0 + deadline - 1,
        jitter=0.0,
        policies=Policies(poll=policy),
    )
    assert isinstance(still.command, PollImport)
    late = decide(
        state,
        PollImport(),
        Polled(facts("importing", import_locked=True)),
        now=100.0 + deadline + 1,
        jitter=0.0,
        policies=Policies(poll=policy),
    )
    assert written(late).error_code == "import_timeout"


def test_polling_backs_off_and_asks_for_tasks_when_the_lock_is_gone() -> None:
    state = importing_state()
    delays = []
    for _ in range(8):
        result = step(state, PollImport(), Polled(facts("importing", import_locked=True)))
        assert isinstance(result.command, PollImport)
        delays.append(result.command.delay_s)
        state = result.state
    assert delays == sorted(delays)
    assert delays[-1] <= PollPolicy().max_delay_s * 1.25
    unlocked = step(state, PollImport(), Polled(facts("importing", import_locked=False)))
    assert isinstance(unlocked.command, PollImport)
    assert unlocked.command.with_tasks


def test_stage_size_mismatch_fails_and_cleans_up() -> None:
    state = fresh(phase=Phase.STAGING, image_exists=True, source_hash=HASH)
    result = step(state, CheckStaged(), StageChecked(facts("uploading", size=SIZE - 1)))
    assert isinstance(result.command, DeleteImage)
    assert written(result).error_code == "stage_size_mismatch"


def test_hash_mismatch_fails_unless_the_cloud_was_asked_to_rewrite() -> None:
    other = replace(ACTIVE, os_hash_value="b" * 128)
    plain = step(importing_state(), PollImport(), Polled(other))
    assert written(plain).error_code == "checksum_mismatch"
    assert written(plain).verification == Verification.MISMATCH
    rewritten = step(importing_state(asks_for_rewrite=True), PollImport(), Polled(other))
    assert rewritten.finished
    assert rewritten.state.phase is Phase.DONE
    assert written(rewritten).verification == Verification.TRANSFORMED


def test_other_hash_algorithm_is_not_checked_rather_than_failed() -> None:
    md5_cloud = replace(ACTIVE, os_hash_algo="sha256", os_hash_value="c" * 64)
    result = step(importing_state(), PollImport(), Polled(md5_cloud))
    assert result.state.phase is Phase.DONE
    assert written(result).verification == Verification.NOT_CHECKED


@pytest.mark.parametrize(
    "error", [ConnectionFailed("reset"), CloudUnavailable("503"), QuotaExceeded("full")]
)
def test_retryable_errors_retry_the_same_command_with_backoff(error: MigrationError) -> None:
    state = fresh(phase=Phase.STAGING, image_exists=True)
    result = step(state, StageData(), Errored(error))
    assert isinstance(result.command, StageData)
    assert result.command.delay_s > 0
    assert result.event == "image.retry_scheduled"
    if isinstance(error, QuotaExceeded):
        assert result.command.delay_s >= RetryPolicy().quota_delay_s


def test_retries_are_bounded_then_the_image_fails_with_the_last_code() -> None:
    policies = Policies(retry=RetryPolicy(max_attempts=3))
    state = fresh(phase=Phase.STAGING, image_exists=True)
    command: Command = StageData()
    for _ in range(2):
        result = decide(
            state,
            command,
            Errored(CloudUnavailable("503")),
            now=100.0,
            jitter=0.1,
            policies=policies,
        )
        assert result.command is not None
        state, command = result.state, result.command
    result = decide(
        state, command, Errored(CloudUnavailable("503")), now=100.0, jitter=0.1, policies=policies
    )
    assert isinstance(result.command, DeleteImage)
    assert written(result).error_code == "cloud_unavailable"


def test_permanent_error_before_any_image_exists_fails_without_cleanup() -> None:
    started = begin(fresh())
    result = step(started.state, CreateImage(), Errored(SourceError("gone")))
    assert result.finished
    assert result.state.phase is Phase.FAILED
    assert finished(result).cleanup is None


def test_create_conflict_adopts_the_image_an_earlier_attempt_made() -> None:
    started = begin(fresh())
    adopted = step(started.state, CreateImage(), Errored(Conflict("exists")))
    assert isinstance(adopted.command, InspectImage)
    resumed = step(adopted.state, InspectImage(), Inspected(facts("queued")))
    assert isinstance(resumed.command, StageData)


def test_stage_conflict_after_a_lost_response_goes_on_to_import() -> None:
    state = fresh(phase=Phase.STAGING, image_exists=True)
    looked = step(state, StageData(), Errored(Conflict("uploading to uploading")))
    assert isinstance(looked.command, InspectImage)
    result = step(looked.state, InspectImage(), Inspected(facts("uploading", size=SIZE)))
    assert isinstance(result.command, RequestImport)


@pytest.mark.parametrize(
    ("status", "size", "expected"),
    [
        ("queued", None, StageData),
        ("uploading", SIZE, RequestImport),
        ("uploading", SIZE // 2, DeleteImage),  # wrong size: make it again
        ("importing", SIZE, PollImport),
        ("active", SIZE, HashSource),  # our hash was lost with the crash: hash locally
    ],
)
def test_resume_acts_on_the_real_status(status: str, size: int | None, expected: type) -> None:
    state = fresh(phase=Phase.STAGING, image_exists=True)
    started = begin(state)
    assert isinstance(started.command, InspectImage)
    result = step(started.state, InspectImage(), Inspected(facts(status, size=size)))
    assert isinstance(result.command, expected)


def test_resume_of_an_active_image_verifies_after_hashing() -> None:
    state = fresh(phase=Phase.IMPORTING, image_exists=True)
    hashing = step(state, InspectImage(), Inspected(ACTIVE))
    assert isinstance(hashing.command, HashSource)
    looked = step(hashing.state, HashSource(), Hashed(HASH))
    assert isinstance(looked.command, InspectImage)
    done = step(looked.state, InspectImage(), Inspected(ACTIVE))
    assert done.state.phase is Phase.DONE
    assert written(done).verification == Verification.VERIFIED


def test_recreated_image_gets_a_new_deterministic_id() -> None:
    state = fresh(phase=Phase.STAGING, image_exists=True)
    deleting = step(state, InspectImage(), Inspected(facts("uploading", size=1)))
    assert isinstance(deleting.command, DeleteImage)
    assert deleting.command.then_recreate
    recreated = step(deleting.state, deleting.command, Deleted(then_recreate=True))
    assert isinstance(recreated.command, CreateImage)
    assert recreated.state.image_id == next_image_id(state.image_id) != state.image_id
    assert recreated.change == ImageReplaced(recreated.state.image_id)


def test_a_stage_check_that_finds_the_import_running_polls_by_the_configured_policy() -> None:
    # The image is importing already when the stage is checked (an earlier run asked for it).
    state = fresh(phase=Phase.STAGING, image_exists=True, source_hash=HASH)
    policies = Policies(poll=PollPolicy(first_delay_s=7.0))
    locked = StageChecked(facts("importing", size=SIZE, import_locked=True))
    result = decide(state, CheckStaged(), locked, now=100.0, jitter=0.5, policies=policies)
    assert isinstance(result.command, PollImport)
    assert result.command.delay_s == 7.0  # the first delay, jitter 0.5 scaling it by 1
    assert result.state.phase is Phase.IMPORTING


def test_restarts_are_bounded() -> None:
    state = fresh(phase=Phase.STAGING, image_exists=True, source_hash=HASH)
    for _ in range(3):
        result = step(state, CheckStaged(), StageChecked(facts("queued")))
        assert isinstance(result.command, StageData)
        state = result.state
    given_up = step(state, CheckStaged(), StageChecked(facts("queued")))
    assert isinstance(given_up.command, DeleteImage)
    assert written(given_up).error_code == "import_failed"


def test_image_missing_while_importing_is_gone_not_recreated() -> None:
    result = step(importing_state(), PollImport(), Errored(NotFound("no image")))
    assert result.finished
    assert written(result).error_code == "image_gone"


def test_resumed_uploading_image_with_an_import_lock_is_polled_not_imported_again() -> None:
    # The import was accepted but its answer was lost: a second POST would only get 409.
    state = fresh(phase=Phase.IMPORTING, image_exists=True)
    result = step(
        state, InspectImage(), Inspected(facts("uploading", size=SIZE, import_locked=True))
    )
    assert isinstance(result.command, PollImport)
    assert result.state.import_request_id is not None


def test_queued_image_whose_stage_was_refused_is_made_again() -> None:
    # 409 "has data on staging": the stale file stays until the image is deleted.
    state = fresh(phase=Phase.STAGING, image_exists=True)
    looked = step(state, StageData(), Errored(Conflict("has data on staging")))
    result = step(looked.state, InspectImage(), Inspected(facts("queued")))
    assert isinstance(result.command, DeleteImage)
    assert result.command.then_recreate


def test_conflicts_that_never_settle_fail_the_image() -> None:
    state = fresh(phase=Phase.IMPORTING, image_exists=True, source_hash=HASH)
    command: Command = RequestImport(request_id="req-x")
    for _ in range(5):
        looked = step(state, command, Errored(Conflict("Image has active task")))
        assert isinstance(looked.command, InspectImage)
        again = step(looked.state, InspectImage(), Inspected(facts("uploading", size=SIZE)))
        assert again.command is not None
        state, command = again.state, again.command
    given_up = step(state, command, Errored(Conflict("Image has active task")))
    assert isinstance(given_up.command, DeleteImage)
    assert written(given_up).error_code == "conflict"


def test_missing_image_while_creating_is_created_again_under_the_same_id() -> None:
    # A create that never landed (or is still on its way): the same id keeps it idempotent.
    state = fresh(phase=Phase.CREATING, image_exists=True)
    result = step(state, InspectImage(), Errored(NotFound("no image")))
    assert isinstance(result.command, CreateImage)
    assert result.state.image_id == state.image_id


def test_adopted_id_that_turns_out_missing_gets_a_new_id() -> None:
    # Real Glance answers 409 for the id of a deleted image, then 404 on a GET of it.
    adopted = step(begin(fresh()).state, CreateImage(), Errored(Conflict("exists")))
    result = step(adopted.state, InspectImage(), Errored(NotFound("no image")))
    assert isinstance(result.command, CreateImage)
    assert result.state.image_id == next_image_id(adopted.state.image_id)
    assert result.change == ImageReplaced(result.state.image_id)


def test_recreating_clears_the_progress_of_the_old_image() -> None:
    state = replace(importing_state(), phase=Phase.STAGING)
    deleting = step(state, InspectImage(), Inspected(facts("uploading", size=1)))
    assert deleting.command is not None
    recreated = step(deleting.state, deleting.command, Deleted(then_recreate=True))
    assert recreated.change == ImageReplaced(recreated.state.image_id)  # it clears the rest
    assert recreated.state.import_accepted_at is None


@pytest.mark.parametrize(
    ("state", "expected_command", "cleanup"),
    [
        (fresh(phase=Phase.STAGING, image_exists=True), DeleteImage, None),
        (fresh(phase=Phase.CREATING), DeleteImage, None),  # the create may have landed
        (fresh(phase=Phase.STAGING, image_exists=True, keep_on_failure=True), None, "kept"),
        (fresh(), None, None),  # nothing was made
    ],
)
def test_cancel_cleans_up_like_a_permanent_failure(
    state: ImageState, expected_command: type | None, cleanup: str | None
) -> None:
    result = cancel(state, now=5.0)
    assert written(result).error_code == "cancelled"
    if expected_command is None:
        assert result.finished
        assert result.state.phase is Phase.FAILED
        assert finished(result).cleanup == cleanup
        return
    assert isinstance(result.command, DeleteImage)
    assert expected_command is DeleteImage
    final = step(result.state, result.command, Deleted())
    assert final.state.phase is Phase.FAILED
    assert finished(final).cleanup == "deleted"
    assert final.error is not None
    assert final.error.code == "cancelled"


def test_retry_budget_counts_from_the_images_first_failure_across_steps() -> None:
    policies = Policies(retry=RetryPolicy(budget_s=10.0, base_delay_s=1.0, max_delay_s=1.0))
    state = fresh(phase=Phase.STAGING, image_exists=True)
    retried = decide(
        state,
        StageData(),
        Errored(CloudUnavailable("503")),
        now=100.0,
        jitter=0.0,
        policies=policies,
    )
    staged = decide(
        retried.state, StageData(), Staged(SIZE, HASH), now=101.0, jitter=0.0, policies=policies
    )
    assert staged.state.failures == 0
    late = decide(
        staged.state,
        CheckStaged(),
        Errored(CloudUnavailable("503")),
        now=112.0,
        jitter=0.0,
        policies=policies,
    )
    assert isinstance(late.command, DeleteImage)
    assert written(late).error_code == "cloud_unavailable"


def test_retry_after_sets_the_delay_and_the_recorded_reason() -> None:
    state = fresh(phase=Phase.STAGING, image_exists=True)
    result = step(state, StageData(), Errored(RateLimited("slow down", retry_after_s=7.0)))
    assert isinstance(result.command, StageData)
    assert result.command.delay_s == 7.0
    assert result.event == "image.retry_scheduled"
    assert "Retry-After 7 s" in str(result.detail["reason"])
    assert result.detail["step"] == "StageData"


def test_md5_is_compared_only_when_asked_for() -> None:
    glance_md5 = replace(ACTIVE, checksum="0" * 32)
    unasked = step(importing_state(), PollImport(), Polled(glance_md5))
    assert written(unasked).verification == Verification.VERIFIED

    asked = importing_state(verify_md5=True, source_md5="1" * 32)
    failed = step(asked, PollImport(), Polled(glance_md5))
    assert written(failed).error_code == "checksum_mismatch"
    assert "md5" in str(written(failed).error_message)
    matching = step(asked, PollImport(), Polled(replace(ACTIVE, checksum="1" * 32)))
    assert written(matching).verification == Verification.VERIFIED


def test_a_lost_md5_is_hashed_again_before_verifying() -> None:
    state = importing_state(verify_md5=True)
    hashing = step(state, PollImport(), Polled(ACTIVE))
    assert isinstance(hashing.command, HashSource)
    looked = step(hashing.state, HashSource(), Hashed(HASH, "2" * 32))
    assert looked.change == SourceHashed(SourceHashes("sha512", HASH, "2" * 32))


def test_an_import_frozen_across_an_outage_of_glance_is_made_again() -> None:
    state = importing_state()
    frozen = (TaskFacts("processing", state.import_request_id, updated_at=100.0),)
    lost = Polled(facts("importing"), frozen, image_outage=(150.0, 200.0))
    policies = Policies(poll=PollPolicy(lost_import_s=60.0))

    waiting = decide(state, PollImport(), lost, now=230.0, jitter=0.0, policies=policies)
    assert isinstance(waiting.command, PollImport)  # too soon after the outage to tell

    redone = decide(state, PollImport(), lost, now=261.0, jitter=0.0, policies=policies)
    assert isinstance(redone.command, DeleteImage)
    assert redone.command.then_recreate
    assert "the import was lost" in str(redone.detail["reason"])

    alive = (TaskFacts("processing", state.import_request_id, updated_at=210.0),)
    touched = Polled(facts("importing"), alive, image_outage=(150.0, 200.0))
    going_on = decide(state, PollImport(), touched, now=261.0, jitter=0.0, policies=policies)
    assert isinstance(going_on.command, PollImport)  # Glance touched it after the outage


def test_an_import_still_pending_across_an_outage_of_glance_is_made_again() -> None:
    state = importing_state()
    pending = (TaskFacts("pending", state.import_request_id, updated_at=100.0),)
    locked = facts("uploading", size=state.size_bytes, import_locked=True)
    lost = Polled(locked, pending, image_outage=(150.0, 200.0))
    policies = Policies(poll=PollPolicy(lost_import_s=60.0))

    redone = decide(state, PollImport(), lost, now=261.0, jitter=0.0, policies=policies)

    assert isinstance(redone.command, DeleteImage)
    assert redone.command.then_recreate


def test_an_import_frozen_before_this_process_began_is_made_again_by_its_tasks_age() -> None:
    # A worker restarted after Glance's outage knows nothing of it: a task Glance no longer
    # touches (it does every minute while it copies) tells the import was lost.
    state = importing_state()  # accepted at 100.0
    policies = Policies(poll=PollPolicy(stale_task_s=300.0))
    stale_s = 300.0 + state.size_bytes / PollPolicy().stale_rate_bytes_per_s
    frozen = (TaskFacts("processing", state.import_request_id, updated_at=100.0),)
    looked = Polled(facts("importing"), frozen)

    waiting = decide(
        state, PollImport(), looked, now=100.0 + stale_s, jitter=0.0, policies=policies
    )
    assert isinstance(waiting.command, PollImport)

    redone = decide(state, PollImport(), looked, now=101.0 + stale_s, jitter=0.0, policies=policies)
    assert isinstance(redone.command, DeleteImage)
    assert redone.command.then_recreate
    assert "untouched for" in str(redone.detail["reason"])


def test_an_import_with_an_expected_duration_is_looked_at_by_that_expectation() -> None:
    state = fresh(phase=Phase.IMPORTING, image_exists=True, source_hash=HASH)
    accepted = step(state, RequestImport(request_id="req-x"), ImportAccepted("req-x", 20.0))
    assert isinstance(accepted.command, PollImport)
    assert accepted.command.delay_s == 10.0  # half the expected 20 s
    near_end = step(
        accepted.state, accepted.command, Polled(facts("importing", import_locked=True)), 119.6
    )
    assert isinstance(near_end.command, PollImport)
    # 0.4 s before the expected end: the next look lands just after it.
    assert near_end.command.delay_s == pytest.approx(0.4 + 0.2 * PollPolicy().dense_s)
    # Tasks are read by time, not by the number of looks: every 10 s.
    assert near_end.command.with_tasks
    soon = step(
        near_end.state, near_end.command, Polled(facts("importing", import_locked=True)), 120.1
    )
    assert isinstance(soon.command, PollImport)
    assert not soon.command.with_tasks
    later = step(soon.state, soon.command, Polled(facts("importing", import_locked=True)), 130.0)
    assert isinstance(later.command, PollImport)
    assert later.command.with_tasks


def test_an_import_task_that_failed_across_an_outage_of_the_cloud_is_made_again() -> None:
    state = importing_state()
    failed = (TaskFacts("failure", state.import_request_id, "Task failed due to Internal Error"),)
    across = Polled(facts("importing"), failed, cloud_outage=(150.0, 200.0))
    looked = step(state, PollImport(), across, now=210.0)
    redone = step(looked.state, PollImport(), across, now=211.0)
    assert isinstance(redone.command, DeleteImage)
    assert redone.command.then_recreate
    assert "across an outage of the cloud" in str(redone.detail["reason"])
    assert redone.state.restarts == 1

    # With no outage in the import's time, the same failure is the image's own.
    again = step(state, PollImport(), Polled(facts("importing"), failed), now=210.0)
    alone = step(again.state, PollImport(), Polled(facts("importing"), failed), now=211.0)
    assert written(alone).error_code == "import_failed"


def test_a_failed_task_is_read_again_with_the_image_which_then_says_why() -> None:
    failed = (TaskFacts("failure", "req-ours", "Internal Error"),)
    first = step(importing_state(), PollImport(), Polled(facts("importing"), failed))
    assert isinstance(first.command, PollImport)  # not decided on a task alone
    why = Polled(facts("importing", es_failed_reason="virtio error"), failed)
    decided = step(first.state, first.command, why)
    assert written(decided).error_code == "virtio_failed"


# web-download: Glance reads the URL; nothing is staged ---------------------------------------


def web_download_accepted(**changes: object) -> Step:
    """A web-download image created and its import accepted."""
    created = step(
        begin(fresh(web_download=True, **changes)).state, CreateImage(), Created(facts("queued"))
    )
    assert isinstance(created.command, RequestImport)
    assert created.state.phase is Phase.IMPORTING
    return step(created.state, created.command, ImportAccepted(created.command.request_id))


def test_a_web_download_still_queued_under_its_import_lock_is_waited_for() -> None:
    accepted = web_download_accepted()

    waiting = step(accepted.state, PollImport(), Polled(facts("queued", import_locked=True)))
    reverted = step(accepted.state, PollImport(), Polled(facts("queued")))

    assert isinstance(waiting.command, PollImport)
    assert waiting.error is None
    assert written(reverted).error_code == "import_reverted"


@pytest.mark.parametrize(
    ("digest", "verification", "next_command"),
    [
        (None, Verification.NOT_CHECKED, None),
        (("sha512", HASH), Verification.VERIFIED, None),
        (("sha256", "b" * 64), None, HashSource),  # Glance hashed in another algorithm
    ],
)
def test_a_web_download_is_checked_against_what_is_known_of_the_source(
    digest: tuple[str, str] | None,
    verification: Verification | None,
    next_command: type[Command] | None,
) -> None:
    accepted = web_download_accepted(expected_digest=digest)

    result = step(accepted.state, PollImport(), Polled(ACTIVE))

    if next_command is None:
        assert finished(result).verification is verification
    else:
        assert isinstance(result.command, next_command)


def test_a_web_download_of_another_size_or_digest_fails_as_a_mismatch() -> None:
    sized = web_download_accepted()
    digested = web_download_accepted(expected_digest=("sha512", "c" * 128))

    short = step(sized.state, PollImport(), Polled(replace(ACTIVE, size=SIZE - 1)))
    other = step(digested.state, PollImport(), Polled(ACTIVE))

    for result in (short, other):
        assert written(result).verification is Verification.MISMATCH


# --- multi-store imports ------------------------------------------------------------------------

STORED = {"os_hash_algo": "sha512", "os_hash_value": HASH, "size": SIZE, "disk_format": "vmdk"}


@pytest.mark.parametrize(
    ("observed", "must_succeed"),
    [
        # Active after the first store, the second still copying (all_stores_must_succeed
        # false, or the moment between Glance's last store write and its list update).
        (facts("active", stores="fast", importing_to_stores="slow", **STORED), True),
        (facts("active", stores="fast", importing_to_stores="slow", **STORED), False),
        # A store failed, another still copies: with all_stores_must_succeed false it may
        # still take the image.
        (facts("importing", failed_import="slow", importing_to_stores="fast"), False),
    ],
)
def test_a_multi_store_import_with_stores_left_to_do_is_polled_on(
    observed: ImageFacts, must_succeed: bool
) -> None:
    state = importing_state(all_stores_must_succeed=must_succeed)

    result = step(state, PollImport(), Polled(observed))

    assert isinstance(result.command, PollImport)
    assert result.state.phase is Phase.IMPORTING


def test_a_multi_store_import_is_done_once_no_store_is_left_with_the_failed_ones_recorded() -> None:
    observed = facts("active", stores="fast", failed_import="slow", **STORED)

    result = step(importing_state(all_stores_must_succeed=False), PollImport(), Polled(observed))

    change = finished(result)
    assert change.phase is Phase.DONE
    assert change.glance is not None
    assert (change.glance.stores, change.glance.failed_stores) == (("fast",), ("slow",))
    assert result.detail == {"failed_stores": ["slow"]}


@pytest.mark.parametrize(
    ("observed", "must_succeed"),
    [
        (facts("importing", failed_import="slow", importing_to_stores="cold"), True),
        (facts("importing", failed_import="slow,fast"), False),  # no store took it
    ],
)
def test_a_failed_store_fails_the_import_when_all_must_succeed_or_none_is_left(
    observed: ImageFacts, must_succeed: bool
) -> None:
    state = importing_state(all_stores_must_succeed=must_succeed)

    result = step(state, PollImport(), Polled(observed))

    change = written(result)
    assert change.error_code == "import_failed"
    assert change.glance is not None
    assert change.glance.failed_stores == tuple(str(observed.failed_import).split(","))


def test_a_resumed_image_active_in_one_store_of_two_is_polled_not_verified() -> None:
    observed = facts("active", stores="fast", importing_to_stores="slow", **STORED)

    result = step(importing_state(), InspectImage(), Inspected(observed))

    assert isinstance(result.command, PollImport)
    assert result.event is Event.IMAGE_RESUMED_IMPORTING


def test_a_single_store_cloud_records_no_stores() -> None:
    result = step(importing_state(), PollImport(), Polled(facts("active", **STORED)))

    change = finished(result)
    assert change.glance is not None
    assert (change.glance.stores, change.glance.failed_stores) == (None, None)
