//! Connection rows written and read back through a real store: bulk
//! inserts, taken names, and re-sealing under a shared keyring.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use super::write::BULK_ROWS;
use super::*;
use crate::crypto::{Key, Keyring};
use crate::model::{Connection, Mode, NewConnection, State};
use crate::secret::Secret;
use crate::store::{Create, Store, StoreError};

pub(crate) fn new_connection(i: usize) -> NewConnection {
    NewConnection {
        conn: Connection {
            id: Uuid::new_v4(),
            name: format!("c{i:04}"),
            instance: "https://erp.example.com".into(),
            client_id: format!("{i:08X}-A48D-A50E-F710-39C1636C30F6@T"),
            labels: BTreeMap::from([("customer".into(), format!("Customer {i}"))]),
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
            state: State::PendingAuthorization,
        },
        client_secret: Some(Secret::new(format!("secret-{i}"))),
        refresh_token: i
            .is_multiple_of(2)
            .then(|| Secret::new(format!("token-{i}"))),
    }
}

fn store(dir: &tempfile::TempDir) -> Store {
    let keyring = Keyring::new(Key::generate(), vec![]);
    crate::store::testing::open(
        &crate::store::testing::target(dir.path()),
        keyring,
        Create::Yes,
    )
    .unwrap()
}

/// Two handles on one shared keyring: switching it through one switches
/// the other at once; stepping passes re-seal every value, a step at a
/// time; the new key alone then opens everything.
#[test]
fn a_shared_keyring_switches_every_handle_and_passes_reseal_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = crate::store::testing::target(dir.path());
    let old = Key::generate();
    let shared = crate::store::SharedKeyring::new(Keyring::new(old.clone(), vec![]));
    let mut engine = Store::open_target(&path, &shared, Create::Yes).unwrap();
    let reads = Store::open_target(&path, &shared, Create::No).unwrap();
    let news: Vec<NewConnection> = (0..25).map(new_connection).collect();
    let now = chrono::Utc::now();
    engine
        .write(|tx, kr| insert_many(tx, kr, &news, now))
        .unwrap();

    let new = Key::generate();
    engine.register_key(&new).unwrap();
    engine.set_keyring(Keyring::new(new.clone(), vec![old.clone()]));
    assert_eq!(reads.keyring().primary().id(), new.id());
    // A value written through the other handle now seals under the new key.
    let id = news[0].conn.id;
    let mut writer = Store::open_target(&path, reads.shared_keyring(), Create::No).unwrap();
    writer
        .write(|tx, kr| {
            set_secret(
                tx,
                kr,
                id,
                SecretColumn::RefreshToken,
                Some(&Secret::new("fresh".to_string())),
            )
        })
        .unwrap();

    let mut cursor = ResealCursor::default();
    let mut steps = 0;
    while !cursor.finished {
        engine.reseal_step(&mut cursor, 10).unwrap();
        steps += 1;
    }
    assert_eq!(steps, 3, "25 rows, 10 a step");
    // 25 client secrets, 13 refresh tokens less the one already re-sealed.
    assert_eq!(cursor.resealed, 25 + 13 - 1);
    assert_eq!(engine.reseal_all(10, |_| {}).unwrap(), 0);
    engine.retire_keys_except(&new).unwrap();

    let alone =
        crate::store::testing::open(&path, Keyring::new(new.clone(), vec![]), Create::No).unwrap();
    for n in &news {
        assert_eq!(
            alone
                .secret(n.conn.id, SecretColumn::ClientSecret)
                .unwrap()
                .unwrap()
                .expose(),
            n.client_secret.as_ref().unwrap().expose()
        );
    }
    assert_eq!(
        alone
            .secret(id, SecretColumn::RefreshToken)
            .unwrap()
            .unwrap()
            .expose(),
        "fresh"
    );
    let err =
        crate::store::testing::open(&path, Keyring::new(old, vec![]), Create::No).unwrap_err();
    assert!(matches!(err, StoreError::RetiredKey { .. }), "{err}");
}

/// 2 multi-row statements and 23 single rows: every row and secret lands.
#[test]
fn a_bulk_insert_writes_every_row_with_its_own_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = store(&dir);
    let news: Vec<NewConnection> = (0..2 * BULK_ROWS + 23).map(new_connection).collect();
    let now = chrono::Utc::now();
    st.write(|tx, kr| insert_many(tx, kr, &news, now)).unwrap();
    assert_eq!(st.count().unwrap(), news.len());
    for new in &news {
        let row = st.get(&new.conn.name).unwrap();
        assert_eq!(row.conn.id, new.conn.id);
        assert_eq!(row.conn.labels, new.conn.labels);
        assert_eq!(row.conn.client_id, new.conn.client_id);
        for (col, want) in [
            (SecretColumn::ClientSecret, &new.client_secret),
            (SecretColumn::RefreshToken, &new.refresh_token),
        ] {
            let got = st.secret(new.conn.id, col).unwrap();
            assert_eq!(
                got.as_ref().map(|s| s.expose().to_string()),
                want.as_ref().map(|s| s.expose().to_string())
            );
        }
    }
}

/// A name another writer took between the import's check and its write
/// is named, inside a multi-row statement as in the single rows, and
/// nothing of the batch is written.
#[test]
fn a_name_taken_meanwhile_is_named_and_nothing_is_written() {
    for taken in [7, 2 * BULK_ROWS + 3] {
        let dir = tempfile::tempdir().unwrap();
        let mut st = store(&dir);
        let now = chrono::Utc::now();
        let mut first = new_connection(taken);
        first.conn.id = Uuid::new_v4();
        st.write(|tx, kr| insert(tx, kr, &first, now)).unwrap();
        let news: Vec<NewConnection> = (0..2 * BULK_ROWS + 5).map(new_connection).collect();
        let err = st
            .write(|tx, kr| insert_many(tx, kr, &news, now))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::DuplicateName(n) if *n == format!("c{taken:04}")),
            "{err}"
        );
        assert_eq!(st.count().unwrap(), 1);
        // The store is still writable: the failed transaction is gone.
        st.write(|tx, kr| insert(tx, kr, &new_connection(9999), now))
            .unwrap();
        assert_eq!(st.count().unwrap(), 2);
    }
}
