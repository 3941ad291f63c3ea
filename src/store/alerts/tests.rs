//! The outbox's transitions on a real store in a temporary directory:
//! raising, re-raising, resolving, syncing a connection's desired set,
//! delivery marks and pruning.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use super::*;
use crate::crypto::{Key, Keyring};
use crate::model::{
    AlertKind, Connection, ConnectionRow, Mode, NewConnection, State, Status, Timestamp,
};
use crate::secret::Secret;
use crate::store::{Create, Store, connections};

const CHANNEL: &str = "ops";

fn store(dir: &tempfile::TempDir) -> Store {
    let keyring = Keyring::new(Key::generate(), vec![]);
    let mut st = crate::store::testing::open(
        &crate::store::testing::target(dir.path()),
        keyring,
        Create::Yes,
    )
    .unwrap();
    st.write(|tx, _| sync_channels(tx, &[(CHANNEL.into(), "webhook".into())]))
        .unwrap();
    st
}

fn t0() -> Timestamp {
    chrono::DateTime::from_timestamp(1_780_000_000, 0).unwrap()
}

/// Long before anything was sent: no repeat is ever due.
fn no_repeats() -> Timestamp {
    t0() - chrono::Duration::days(365)
}

fn global(kind: AlertKind, summary: &str) -> AlertFacts {
    AlertFacts::global(kind, Severity::Critical, summary, "look at it")
}

fn due_now(st: &Store, send_resolved: bool) -> Vec<Due> {
    due(st, CHANNEL, Severity::Info, send_resolved, no_repeats()).unwrap()
}

/// The channel accepts every alert it is due, as one message about `kind`.
fn accept_all(st: &mut Store, kind: AlertKind, now: Timestamp) {
    let accepted: Vec<Accepted> = due_now(st, true)
        .into_iter()
        .map(|d| Accepted {
            alert_id: d.alert_id,
            revision: d.revision,
            status: d.status,
        })
        .collect();
    st.write(|tx, _| record_success(tx, CHANNEL, kind, &accepted, now))
        .unwrap();
}

fn count(st: &Store, sql: &str) -> i64 {
    st.db().query_row(sql, (), |r| r.get(0)).unwrap()
}

fn connection(st: &mut Store) -> ConnectionRow {
    let new = NewConnection {
        conn: Connection {
            id: Uuid::new_v4(),
            name: "acme".into(),
            instance: "erp.example.com".into(),
            client_id: "0A1B2C3D-A48D-A50E-F710-39C1636C30F6@T".into(),
            labels: BTreeMap::new(),
            mode: Mode::Sliding,
            lifetime: Duration::from_secs(30 * 86400),
            absolute_lifetime: None,
            secret_expires_at: None,
            grant_issued_at: None,
            refresh_token_issued_at: None,
            access_expires_at: None,
            deadline: None,
            deadline_source: None,
            next_refresh_at: None,
            last_refresh_at: None,
            last_error: None,
            state: State::NeedsSecret,
        },
        client_secret: Some(Secret::new("s".to_string())),
        refresh_token: None,
    };
    st.write(|tx, kr| connections::insert(tx, kr, &new, t0()))
        .unwrap();
    st.get("acme").unwrap()
}

fn about(row: &ConnectionRow, kind: AlertKind, severity: Severity) -> AlertFacts {
    AlertFacts {
        kind,
        severity,
        connection: row.conn.name.clone(),
        connection_id: Some(row.conn.id),
        labels: BTreeMap::new(),
        instance: Some(row.conn.instance.clone()),
        state: Some(row.conn.state),
        summary: format!("{kind} about acme"),
        action: "fix acme".into(),
        deadline: None,
    }
}

#[test]
fn a_raised_alert_resolves_and_a_channel_that_heard_it_hears_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = store(&dir);
    let facts = global(AlertKind::ConfigReloadFailed, "reload refused");
    st.write(|tx, _| raise(tx, &facts, t0())).unwrap();

    let due = due_now(&st, true);
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].status, due[0].revision), (Status::Firing, 1));
    assert_eq!(due[0].facts, facts);
    assert_eq!(
        firing_counts(&st).unwrap(),
        BTreeMap::from([(AlertKind::ConfigReloadFailed, 1)])
    );

    accept_all(&mut st, AlertKind::ConfigReloadFailed, t0());
    assert!(due_now(&st, true).is_empty(), "accepted: nothing left due");
    assert_eq!(undelivered(&st, CHANNEL, Severity::Info, true).unwrap(), 0);

    let later = t0() + chrono::Duration::minutes(5);
    st.write(|tx, _| resolve_global(tx, AlertKind::ConfigReloadFailed, later))
        .unwrap();
    assert!(firing_counts(&st).unwrap().is_empty());
    let due = due_now(&st, true);
    assert_eq!(
        due.len(),
        1,
        "the channel that heard the firing hears the end"
    );
    assert_eq!((due[0].status, due[0].revision), (Status::Resolved, 2));
    assert_eq!(due[0].changed_at, later);
    assert_eq!(undelivered(&st, CHANNEL, Severity::Info, true).unwrap(), 1);
    assert!(
        due_now(&st, false).is_empty(),
        "without send_resolved, a resolution is not sent"
    );
}

#[test]
fn raising_again_while_firing_bumps_the_revision_of_the_same_alert() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = store(&dir);
    let facts = global(AlertKind::StoreWriteFailed, "2 tokens spilled");
    st.write(|tx, _| raise(tx, &facts, t0())).unwrap();
    let first = due_now(&st, true).remove(0);
    accept_all(&mut st, AlertKind::StoreWriteFailed, t0());

    let again = global(AlertKind::StoreWriteFailed, "3 tokens spilled");
    let later = t0() + chrono::Duration::minutes(1);
    st.write(|tx, _| raise(tx, &again, later)).unwrap();
    let due = due_now(&st, true);
    assert_eq!(due.len(), 1, "said again, not a second alert");
    assert_eq!(due[0].alert_id, first.alert_id);
    assert_eq!(due[0].revision, 2);
    assert!(!due[0].repeat, "a new revision, not a repeat");
    assert_eq!(due[0].facts.summary, "3 tokens spilled");
    assert_eq!(due[0].sends, 1);
    assert_eq!(count(&st, "SELECT COUNT(*) FROM alerts"), 1);
}

#[test]
fn sync_connection_raises_and_resolves_from_the_desired_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = store(&dir);
    let row = connection(&mut st);
    let needs = about(&row, AlertKind::NeedsSecret, Severity::Warning);
    let failed = about(&row, AlertKind::RefreshFailed, Severity::Warning);

    let desired = vec![needs.clone(), failed.clone()];
    st.write(|tx, _| sync_connection(tx, &row, &desired, t0()))
        .unwrap();
    assert_eq!(
        firing_counts(&st).unwrap(),
        BTreeMap::from([(AlertKind::NeedsSecret, 1), (AlertKind::RefreshFailed, 1)])
    );
    assert_eq!(
        firing_connection_ids(&st).unwrap(),
        vec![row.conn.id.to_string()]
    );
    accept_all(&mut st, AlertKind::NeedsSecret, t0());

    // The same set again: nothing new to say.
    st.write(|tx, _| sync_connection(tx, &row, &desired, t0()))
        .unwrap();
    assert!(due_now(&st, true).is_empty());

    // An escalation fires again; the other condition stays as it was.
    let worse = AlertFacts {
        severity: Severity::Critical,
        ..failed.clone()
    };
    let desired = vec![needs.clone(), worse];
    st.write(|tx, _| sync_connection(tx, &row, &desired, t0()))
        .unwrap();
    let due = due_now(&st, true);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].facts.kind, AlertKind::RefreshFailed);
    assert_eq!(due[0].facts.severity, Severity::Critical);
    assert_eq!(due[0].revision, 2);

    // A set-aside row's alert is not one of its conditions: sync leaves it.
    let key = row.conn.id.to_string();
    let faulty = about(&row, AlertKind::ConnectionFaulty, Severity::Critical);
    st.write(|tx, _| raise_faulty(tx, &key, &faulty, t0()))
        .unwrap();

    // Nothing desired any more: both conditions resolve.
    st.write(|tx, _| sync_connection(tx, &row, &[], t0()))
        .unwrap();
    assert_eq!(
        firing_counts(&st).unwrap(),
        BTreeMap::from([(AlertKind::ConnectionFaulty, 1)])
    );
    assert!(faulty_fires(&st, &key).unwrap());
    let resolved: Vec<AlertKind> = due_now(&st, true)
        .into_iter()
        .filter(|d| d.status == Status::Resolved)
        .map(|d| d.facts.kind)
        .collect();
    assert_eq!(
        resolved.len(),
        2,
        "the channel heard both firings: {resolved:?}"
    );
    // Each firing, the escalation and each resolution is in the history.
    assert_eq!(
        count(&st, "SELECT COUNT(*) FROM events WHERE event = 'alert'"),
        2 + 1 + 1 + 2
    );
}

#[test]
fn delivery_marks_track_health_and_prune_keeps_what_a_channel_is_still_owed() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = store(&dir);
    let heard = global(AlertKind::ConfigReloadFailed, "reload refused");
    st.write(|tx, _| raise(tx, &heard, t0())).unwrap();

    // A failed attempt backs off; a success clears it.
    let retry = t0() + chrono::Duration::seconds(30);
    st.write(|tx, _| record_failure(tx, CHANNEL, "ops: 503 from hooks.example.com", retry, t0()))
        .unwrap();
    let health = channel(&st, CHANNEL).unwrap();
    assert_eq!(health.failures, 1);
    assert_eq!(health.retry_at, Some(retry));
    assert_eq!(health.last_error_at, Some(t0()));
    accept_all(&mut st, AlertKind::ConfigReloadFailed, t0());
    let health = channel(&st, CHANNEL).unwrap();
    assert_eq!((health.failures, health.retry_at), (0, None));
    assert_eq!(health.last_success_at, Some(t0()));
    assert_eq!(
        group_times(&st, CHANNEL).unwrap(),
        BTreeMap::from([(AlertKind::ConfigReloadFailed, t0())])
    );
    assert_eq!(
        delivered_counts(&st).unwrap(),
        BTreeMap::from([(CHANNEL.to_string(), 1)])
    );

    // One alert never heard of, then both resolve.
    let unheard = global(AlertKind::StoreWriteFailed, "1 token spilled");
    st.write(|tx, _| raise(tx, &unheard, t0())).unwrap();
    st.write(|tx, _| {
        resolve_global(tx, AlertKind::ConfigReloadFailed, t0())?;
        resolve_global(tx, AlertKind::StoreWriteFailed, t0())
    })
    .unwrap();

    let dropped = st.write(|tx, _| prune(tx, true)).unwrap();
    assert_eq!(dropped.len(), 1, "only the unheard alert goes unsaid");
    assert_eq!(dropped[0].kind, AlertKind::StoreWriteFailed);
    assert_eq!(
        count(&st, "SELECT COUNT(*) FROM alerts"),
        1,
        "the channel is still owed the end of the alert it heard"
    );

    accept_all(&mut st, AlertKind::ConfigReloadFailed, t0());
    let dropped = st.write(|tx, _| prune(tx, true)).unwrap();
    assert!(dropped.is_empty(), "it was heard, so it is not reported");
    assert_eq!(count(&st, "SELECT COUNT(*) FROM alerts"), 0);
    assert_eq!(count(&st, "SELECT COUNT(*) FROM alert_deliveries"), 0);
}

#[test]
fn removing_a_channel_forgets_what_it_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = store(&dir);
    st.write(|tx, _| raise(tx, &global(AlertKind::Test, "test"), t0()))
        .unwrap();
    accept_all(&mut st, AlertKind::Test, t0());
    st.write(|tx, _| sync_channels(tx, &[])).unwrap();
    assert_eq!(count(&st, "SELECT COUNT(*) FROM alert_deliveries"), 0);
    assert_eq!(count(&st, "SELECT COUNT(*) FROM alert_groups"), 0);
    assert_eq!(channel(&st, CHANNEL).unwrap(), ChannelRow::default());
}
