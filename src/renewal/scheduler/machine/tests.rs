//! The machine alone, with the time set by hand: what it starts, in which
//! order, within which limits, and when it wakes.

use std::collections::{BTreeMap, HashMap};

use chrono::TimeZone;

use super::*;
use crate::model::{Connection, Mode};
use crate::renewal::scheduler::{ASIDE_FIRST, ASIDE_MAX};

fn t0() -> Timestamp {
    chrono::Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn mins(n: i64) -> chrono::Duration {
    chrono::Duration::minutes(n)
}

/// A healthy active connection planned for `next` with `deadline`.
fn row(instance: &str, next: Timestamp, deadline: Timestamp) -> ConnectionRow {
    let now = t0();
    ConnectionRow {
        conn: Connection {
            id: Uuid::new_v4(),
            name: format!("c-{instance}"),
            instance: instance.into(),
            client_id: "X@T".into(),
            labels: BTreeMap::new(),
            mode: Mode::Absolute,
            lifetime: Duration::from_secs(30 * 86_400),
            absolute_lifetime: None,
            secret_expires_at: None,
            grant_issued_at: Some(now),
            refresh_token_issued_at: Some(now),
            access_expires_at: None,
            deadline: Some(deadline),
            deadline_source: None,
            next_refresh_at: Some(next),
            last_refresh_at: None,
            last_error: None,
            state: State::Active,
        },
        failures: 0,
        failing_since: None,
        outcome_unknown: false,
        has_client_secret: true,
        has_refresh_token: true,
        has_access_token: false,
        token_type: None,
        access_lifetime: None,
        claim: None,
        version: 1,
        change_seq: 1,
    }
}

/// A row due now with `deadline` minutes left.
fn due_row(instance: &str, deadline: i64) -> ConnectionRow {
    row(instance, t0() - mins(1), t0() + mins(deadline))
}

fn policy() -> Policy {
    Policy::default()
}

/// Fires everything due at `now`, answering each wake-up's read from `rows`
/// (as the driver does from the store).
fn fire_all(m: &mut Machine, rows: &HashMap<Uuid, ConnectionRow>, now: Timestamp) {
    while let Some(w) = m.next_wake(now) {
        match m.fire(w) {
            Some(Look::Due(id)) => {
                let read = Ok(rows.get(&id).cloned().map(Ok));
                m.due_read(id, read, &policy(), now);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn machine(global: usize, per_instance: usize, rows: &[ConnectionRow]) -> Machine {
    let mut m = Machine::new(global, per_instance, Duration::from_secs(60));
    for r in rows {
        m.upsert(r, &policy(), t0());
    }
    m
}

fn by_id(rows: &[ConnectionRow]) -> HashMap<Uuid, ConnectionRow> {
    rows.iter().map(|r| (r.conn.id, r.clone())).collect()
}

/// A refresh ended with `row` saved (planned `next`).
fn done(id: Uuid, row: Option<ConnectionRow>) -> Done {
    Done {
        id,
        fault: None,
        error: None,
        sent: true,
        row: Ok(row.map(Ok)),
    }
}

fn replanned(r: &ConnectionRow, next: Timestamp) -> ConnectionRow {
    let mut r = r.clone();
    r.conn.next_refresh_at = Some(next);
    r
}

#[test]
fn a_burst_of_thousands_due_at_once_starts_in_deadline_order_within_both_limits() {
    let (global, per) = (64, 2);
    // Deadlines spread over the instances in no particular order (a
    // multiplicative hash), so instances hit their limit mid-burst.
    let rows: Vec<_> = (0..3000u64)
        .map(|i| {
            let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            due_row(&format!("site{}", i % 40), 60 + (h % 100_000) as i64)
        })
        .collect();
    let mut m = Machine::new(global, per, Duration::from_secs(60));
    for r in &rows {
        m.load(r, &policy(), t0());
    }
    m.finish_load();
    let all = by_id(&rows);
    fire_all(&mut m, &all, t0());
    assert_eq!(m.snapshot().ready, 3000);

    // The oracle: earliest deadline first, skipping an instance at its limit.
    let mut waiting: Vec<&ConnectionRow> = rows.iter().collect();
    waiting.sort_by_key(|r| (r.conn.deadline, m.index[&r.conn.id]));
    let mut busy: HashMap<&str, usize> = HashMap::new();
    let mut running: Vec<Uuid> = Vec::new();
    let (mut started, mut skipped) = (0, 0);
    while started < rows.len() {
        let mut expected = Vec::new();
        waiting.retain(|r| {
            let b = busy.entry(r.conn.instance.as_str()).or_default();
            if running.len() + expected.len() < global && *b < per {
                *b += 1;
                expected.push(r.conn.id);
                false
            } else {
                skipped += (running.len() + expected.len() < global) as usize;
                true
            }
        });
        let got = m.start();
        assert_eq!(got, expected, "after {started} started");
        assert!(m.snapshot().running <= global);
        started += got.len();
        running.extend(got);
        // The oldest refresh ends, planned a day later: its slot is free.
        let id = running.remove(0);
        let r = &all[&id];
        *busy.get_mut(r.conn.instance.as_str()).unwrap() -= 1;
        m.finished(
            done(id, Some(replanned(r, t0() + mins(1440)))),
            &policy(),
            t0(),
        );
    }
    assert_eq!(m.snapshot().ready, 0);
    assert!(skipped > 0, "an instance at its limit was passed over");
}

#[test]
fn the_per_instance_limit_holds_while_other_instances_proceed() {
    let a: Vec<_> = (0..4).map(|i| due_row("a", 10 + i)).collect();
    let b: Vec<_> = (0..3).map(|i| due_row("b", 100 + i)).collect();
    let rows: Vec<_> = a.iter().chain(&b).cloned().collect();
    let mut m = machine(10, 2, &rows);
    fire_all(&mut m, &by_id(&rows), t0());
    let ids = |rs: &[ConnectionRow]| rs.iter().map(|r| r.conn.id).collect::<Vec<_>>();
    let first = m.start();
    // a's two nearest deadlines, then b goes on (its deadlines are later).
    let mut expected = ids(&a[..2]);
    expected.extend(ids(&b[..2]));
    assert_eq!(first, expected);
    assert!(m.start().is_empty(), "both instances are at their limit");
    // One of a's ends: a's next starts, not b's (b is still full).
    let next = replanned(&a[0], t0() + mins(1440));
    m.finished(done(a[0].conn.id, Some(next)), &policy(), t0());
    assert_eq!(m.start(), ids(&a[2..3]));
    assert_eq!(m.snapshot().running, 4);
    assert_eq!(m.snapshot().ready, 2);
}

#[test]
fn a_finished_refresh_frees_its_slot_and_starts_the_next() {
    let rows = [due_row("a", 30), due_row("b", 10), due_row("c", 20)];
    let mut m = machine(1, 5, &rows);
    fire_all(&mut m, &by_id(&rows), t0());
    assert_eq!(m.start(), [rows[1].conn.id], "earliest deadline first");
    assert!(m.start().is_empty(), "the global limit is one");
    let later = replanned(&rows[1], t0() + mins(1440));
    m.finished(done(rows[1].conn.id, Some(later)), &policy(), t0());
    assert_eq!(m.snapshot().running, 0);
    assert_eq!(m.start(), [rows[2].conn.id]);
    // The finished one waits for its new plan, not in the ready set.
    assert_eq!(m.snapshot().ready, 1);
    assert_eq!(m.snapshot().scheduled, 1);
}

#[test]
fn a_due_connection_removed_while_queued_is_never_started() {
    let rows = [due_row("a", 10), due_row("a", 20), due_row("b", 30)];
    let all = by_id(&rows);
    let mut m = machine(1, 5, &rows);
    // Removed while its wake-up's read was in flight.
    let w = m.next_wake(t0()).unwrap();
    let Some(Look::Due(first)) = m.fire(w) else {
        panic!("a due timer")
    };
    m.remove(first);
    m.due_read(first, Ok(Some(Ok(all[&first].clone()))), &policy(), t0());
    fire_all(&mut m, &all, t0());
    assert_eq!(m.snapshot().ready, 2);
    // Removed while ready.
    let started = m.start();
    assert_eq!(started.len(), 1);
    let queued = rows
        .iter()
        .map(|r| r.conn.id)
        .find(|id| *id != first && *id != started[0])
        .unwrap();
    m.remove(queued);
    assert_eq!(m.snapshot().ready, 0);
    m.finished(done(started[0], None), &policy(), t0());
    assert!(m.start().is_empty());
    assert!(m.next_wake(t0() + mins(10_000)).is_none());
    assert_eq!(m.take_outbox().forget, [first, queued, started[0]]);
}

#[test]
fn a_due_connection_changed_while_queued_starts_with_its_new_plan() {
    let rows = [due_row("a", 10), due_row("b", 20), due_row("c", 30)];
    let all = by_id(&rows);
    let mut m = machine(1, 5, &rows);
    fire_all(&mut m, &all, t0());
    // c's deadline moved before the others while it waited: it goes first.
    let mut c = rows[2].clone();
    c.conn.deadline = Some(t0() + mins(5));
    m.upsert(&c, &policy(), t0());
    let all = by_id(&[rows[0].clone(), rows[1].clone(), c.clone()]);
    fire_all(&mut m, &all, t0());
    assert_eq!(m.start(), [c.conn.id]);
    // b was re-planned for tomorrow while it waited: it is not started.
    let b = replanned(&rows[1], t0() + mins(1440));
    m.upsert(&b, &policy(), t0());
    m.finished(
        done(c.conn.id, Some(replanned(&c, t0() + mins(1440)))),
        &policy(),
        t0(),
    );
    assert_eq!(m.start(), [rows[0].conn.id]);
    let later = replanned(&rows[0], t0() + mins(1440));
    m.finished(done(rows[0].conn.id, Some(later)), &policy(), t0());
    assert!(m.start().is_empty());
    assert_eq!(m.snapshot().ready, 0);
    assert!(m.next_wake(t0() + mins(60)).is_none());
}

#[test]
fn a_wake_up_that_finds_no_refresh_due_only_plans_again() {
    let r = row("a", t0() + mins(10), t0() + mins(10_000));
    let mut m = machine(4, 4, std::slice::from_ref(&r));
    assert_eq!(
        m.sleep_for(t0()),
        Duration::from_secs(60),
        "capped at max_sleep"
    );
    assert!(m.next_wake(t0() + mins(9)).is_none());
    let w = m.next_wake(t0() + mins(10)).expect("its timer");
    assert_eq!(m.fire(w), Some(Look::Due(r.conn.id)));
    // The row as read: someone moved the plan an hour on meanwhile.
    let moved = replanned(&r, t0() + mins(70));
    m.due_read(r.conn.id, Ok(Some(Ok(moved))), &policy(), t0() + mins(10));
    assert!(m.start().is_empty());
    assert!(m.next_wake(t0() + mins(69)).is_none());
    assert!(m.next_wake(t0() + mins(70)).is_some());
}

#[test]
fn a_refresh_whose_plan_did_not_move_is_looked_at_again_in_five_seconds() {
    let r = due_row("a", 100);
    let mut m = machine(4, 4, std::slice::from_ref(&r));
    fire_all(&mut m, &by_id(std::slice::from_ref(&r)), t0());
    assert_eq!(m.start(), [r.conn.id]);
    // The engine saved nothing (blocked): still due, no claim.
    m.finished(done(r.conn.id, Some(r.clone())), &policy(), t0());
    assert!(m.next_wake(t0() + chrono::Duration::seconds(4)).is_none());
    assert!(m.next_wake(t0() + chrono::Duration::seconds(5)).is_some());
}

/// A due connection another process (another replica) is refreshing is
/// looked at again when that claim ends, not over and over meanwhile; one
/// whose claim lapsed but may not be taken over yet, a second later.
#[test]
fn a_connection_claimed_elsewhere_waits_for_the_claim_not_in_a_loop() {
    let secs = chrono::Duration::seconds;
    let r = due_row("a", 100);
    let mut m = machine(4, 4, std::slice::from_ref(&r));
    fire_all(&mut m, &by_id(std::slice::from_ref(&r)), t0());
    assert_eq!(m.start(), [r.conn.id]);
    // The refresh found a live claim of another process, until t0 + 30 s.
    let mut claimed = r.clone();
    claimed.claim = Some(("db2/77/1/serve/0/boot".into(), t0() + secs(30)));
    m.finished(done(r.conn.id, Some(claimed.clone())), &policy(), t0());
    assert!(
        m.next_wake(t0() + secs(29)).is_none(),
        "no look before the claim ends"
    );
    assert!(m.next_wake(t0() + secs(30)).is_some());
    // The holder saved meanwhile: its row plans it anew, days away.
    let saved = replanned(&r, t0() + mins(60 * 24));
    m.upsert(&saved, &policy(), t0() + secs(5));
    assert!(m.next_wake(t0() + secs(30)).is_none());

    // A claim whose end passed: a second from now, not at once.
    let mut lapsed = r.clone();
    lapsed.claim = Some(("db2/77/1/serve/0/boot".into(), t0() - secs(3)));
    m.upsert(&lapsed, &policy(), t0());
    assert!(m.next_wake(t0()).is_none());
    assert!(m.next_wake(t0() + secs(1)).is_some());
}

/// Replicas catching up together start their own share first, earliest
/// deadline first within it, and the others' after; when the share changes
/// (a replica died), what is ready is ordered anew.
#[test]
fn replicas_start_their_own_share_first() {
    use crate::renewal::scheduler::Share;
    let rows: Vec<ConnectionRow> = (0..40)
        .map(|i| due_row(&format!("i{i}"), 100 + i))
        .collect();
    let me = Share { me: 1, of: 2 };
    let mine: Vec<Uuid> = rows
        .iter()
        .map(|r| r.conn.id)
        .filter(|id| me.owns(*id))
        .collect();
    assert!(
        !mine.is_empty() && mine.len() < rows.len(),
        "ids fall to both replicas"
    );
    let mut m = machine(mine.len(), 1, &rows);
    m.set_share(me);
    fire_all(&mut m, &by_id(&rows), t0());
    let started = m.start();
    assert_eq!(started.len(), mine.len());
    assert!(started.iter().all(|id| me.owns(*id)), "its own share first");
    let deadlines: Vec<_> = started
        .iter()
        .map(|id| {
            rows.iter()
                .find(|r| r.conn.id == *id)
                .unwrap()
                .conn
                .deadline
        })
        .collect();
    assert!(
        deadlines.windows(2).all(|w| w[0] <= w[1]),
        "earliest deadline first"
    );
    // The other replica is gone: it alone now, and the rest follows.
    m.set_share(Share { me: 0, of: 1 });
    for id in &started {
        m.finished(done(*id, None), &policy(), t0());
    }
    m.set_limits(rows.len(), 1);
    let rest = m.start();
    assert_eq!(rest.len(), rows.len() - mine.len());
    assert!(rest.iter().all(|id| !me.owns(*id)));
}

#[test]
fn a_clock_jump_forward_fires_what_the_new_time_makes_due_and_back_fires_nothing() {
    let rows = [
        row("a", t0() + mins(60), t0() + mins(5000)),
        row("a", t0() + mins(120), t0() + mins(4000)),
        row("b", t0() + mins(3 * 1440), t0() + mins(6000)),
    ];
    let all = by_id(&rows);
    let mut m = machine(10, 1, &rows);
    assert_eq!(m.observe_clock(t0(), Duration::ZERO), None);
    assert_eq!(
        m.observe_clock(
            t0() + chrono::Duration::seconds(61),
            Duration::from_secs(30)
        ),
        None,
        "31 s of drift is not a jump"
    );
    // Forward a day in one second.
    let later = t0() + mins(1440);
    let drift = m
        .observe_clock(later, Duration::from_secs(1))
        .expect("a jump");
    assert!(drift > JUMP);
    fire_all(&mut m, &all, later);
    // Both due, one instance, limit one: the nearer deadline first.
    assert_eq!(m.start(), [rows[1].conn.id]);
    assert_eq!(m.snapshot().ready, 1);
    assert_eq!(m.snapshot().scheduled, 1, "the third is days away still");
    // Back five hours from t0: nothing fires early, and the driver reads
    // the clock again within max_sleep.
    let mut m = machine(10, 1, &rows);
    m.observe_clock(t0(), Duration::ZERO);
    let back = t0() - mins(300);
    let drift = m
        .observe_clock(back, Duration::from_secs(1))
        .expect("a jump");
    assert!(drift < -JUMP);
    assert!(m.next_wake(back).is_none());
    assert_eq!(m.sleep_for(back), Duration::from_secs(60));
    assert!(m.next_wake(t0() + mins(59)).is_none());
    assert!(m.next_wake(t0() + mins(60)).is_some());
}

#[test]
fn a_refresh_that_cannot_run_is_set_aside_and_retried_with_doubling_backoff() {
    let r = due_row("a", 100);
    let id = r.conn.id;
    let all = by_id(std::slice::from_ref(&r));
    let mut m = machine(4, 4, std::slice::from_ref(&r));
    fire_all(&mut m, &all, t0());
    let mut now = t0();
    let mut expected = ASIDE_FIRST;
    for round in 0..8 {
        assert_eq!(m.start(), [id], "round {round}");
        let fault = Done {
            fault: Some("a sealed value does not open".into()),
            sent: false,
            ..done(id, Some(r.clone()))
        };
        m.finished(fault, &policy(), now);
        assert_eq!(m.set_aside_count(), 1);
        let out = m.take_outbox();
        assert!(
            matches!(&out.alerts[..], [AlertOp::Raise { key, .. }] if *key == id.to_string()),
            "{out:?}"
        );
        assert!(m.start().is_empty(), "set aside: not refreshed");
        let wait = chrono::Duration::from_std(expected).unwrap();
        assert!(
            m.next_wake(now + wait - chrono::Duration::seconds(1))
                .is_none()
        );
        now += wait;
        let w = m.next_wake(now).expect("looked at again");
        assert_eq!(w, Wake::Aside(AsideKey::Id(id)));
        assert_eq!(m.fire(w), Some(Look::Due(id)));
        m.due_read(id, Ok(Some(Ok(r.clone()))), &policy(), now);
        expected = (expected * 2).min(ASIDE_MAX);
    }
    assert_eq!(expected, ASIDE_MAX, "the backoff reached its cap");
    // A refresh that gets through ends it, and pokes the alert worker.
    assert_eq!(m.start(), [id]);
    let ok = replanned(&r, now + mins(1440));
    m.finished(done(id, Some(ok)), &policy(), now);
    assert_eq!(m.set_aside_count(), 0);
    assert!(m.take_outbox().poke);
}

#[test]
fn a_row_that_does_not_read_is_set_aside_until_it_reads_again() {
    let r = row("a", t0() + mins(600), t0() + mins(10_000));
    let id = r.conn.id;
    let mut m = machine(4, 4, std::slice::from_ref(&r));
    let fault = Fault {
        rowid: 7,
        id: Some(id),
        key: id.to_string(),
        name: Some("c-a".into()),
        column: "deadline",
        reason: "not a time".into(),
    };
    m.faulty(&fault, t0());
    assert_eq!(m.snapshot().scheduled, 0, "taken off its timer");
    let out = m.take_outbox();
    assert_eq!(out.alerts, [aside::unreadable_alert(&fault)]);
    let now = t0() + mins(1);
    let w = m.next_wake(now).expect("a minute later");
    assert_eq!(m.fire(w), Some(Look::Aside(AsideKey::Id(id))));
    // Still broken: kept aside, looked at again in two minutes.
    m.aside_read(
        AsideKey::Id(id),
        Ok(Some(Err(fault.clone()))),
        &policy(),
        now,
    );
    assert!(m.next_wake(now + mins(1)).is_none());
    let now = now + mins(2);
    let w = m.next_wake(now).expect("two minutes later");
    assert_eq!(m.fire(w), Some(Look::Aside(AsideKey::Id(id))));
    m.take_outbox();
    // Fixed: its alert resolves and its timer is back.
    m.aside_read(AsideKey::Id(id), Ok(Some(Ok(r.clone()))), &policy(), now);
    assert_eq!(m.set_aside_count(), 0);
    assert_eq!(
        m.take_outbox().alerts,
        [AlertOp::Resolve {
            key: id.to_string()
        }]
    );
    assert_eq!(m.snapshot().scheduled, 1);
}
