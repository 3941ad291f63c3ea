use super::*;
use crate::clock::ManualClock;
use crate::config::Config;
use crate::crypto::{Key, Keyring};
use crate::model::NewConnection;
use crate::model::{Connection, Mode};
use crate::store::connections;
use crate::store::{Create, Store};

const TOKEN: &str = "access-token-value-1";

struct Rig {
    _dir: tempfile::TempDir,
    path: crate::config::StoreTarget,
    keyring: Keyring,
    clock: ManualClock,
    engine: Engine,
}

impl Rig {
    fn open(&self) -> Store {
        crate::store::testing::open(&self.path, self.keyring.clone(), Create::No).unwrap()
    }

    async fn answer(&self) -> Option<String> {
        match self.engine.token("acme").await {
            Ok(TokenAnswer::Token(t)) => Some(t.access_token.expose().to_string()),
            _ => None,
        }
    }
}

/// A store with connection `acme` holding a valid access token, and an
/// engine with the token cache on.
fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = crate::store::testing::target(dir.path());
    let keyring = Keyring::new(Key::generate(), Vec::new());
    let now = chrono::Utc::now();
    let clock = ManualClock::new(now);
    let mut st = crate::store::testing::open(&path, keyring.clone(), Create::Yes).unwrap();
    let conn = Connection {
        id: Uuid::new_v4(),
        name: "acme".into(),
        instance: "erp.example.com".into(),
        client_id: "client@Company".into(),
        labels: Default::default(),
        mode: Mode::Absolute,
        lifetime: Duration::from_secs(30 * 86_400),
        absolute_lifetime: None,
        secret_expires_at: None,
        grant_issued_at: Some(now),
        refresh_token_issued_at: Some(now),
        access_expires_at: None,
        deadline: None,
        deadline_source: None,
        next_refresh_at: Some(now + chrono::Duration::hours(20)),
        last_refresh_at: Some(now),
        last_error: None,
        state: State::Active,
    };
    st.write(|tx, kr| {
        let new = NewConnection {
            conn,
            client_secret: None,
            refresh_token: None,
        };
        connections::insert(tx, kr, &new, now)?;
        let mut row = connections::get_tx(tx, "acme")?;
        row.conn.access_expires_at = Some(now + chrono::Duration::hours(1));
        row.access_lifetime = Some(Duration::from_secs(3600));
        row.token_type = Some("Bearer".into());
        connections::put(tx, &row)?;
        connections::set_secret(
            tx,
            kr,
            row.conn.id,
            SecretColumn::AccessToken,
            Some(&Secret::new(TOKEN)),
        )
    })
    .unwrap();
    let config = Config::default();
    let engine = Engine::new(EngineParts {
        store: crate::store::StoreHandle::from_store(st).unwrap(),
        client: TokenClient::new(crate::renewal::client_settings(&config)).unwrap(),
        policy: config.renewal.policy(),
        clock: Arc::new(clock.clone()),
        owner: Owner::current("test"),
        http_timeout: Duration::from_secs(5),
        spill_dir: None,
        limits: crate::renewal::limits::Limits::new(16, 2),
        hooks: Arc::new(NoHooks),
    });
    let reads = crate::store::testing::open(&path, keyring.clone(), Create::No).unwrap();
    engine.cache_tokens(reads);
    Rig {
        _dir: dir,
        path,
        keyring,
        clock,
        engine,
    }
}

#[tokio::test]
async fn a_cached_token_is_never_served_for_a_connection_disabled_elsewhere() {
    let r = rig();
    assert_eq!(r.answer().await.as_deref(), Some(TOKEN));
    assert_eq!(r.answer().await.as_deref(), Some(TOKEN), "served again");
    // Another process (the CLI) disables it: the very next request sees it.
    let mut cli = r.open();
    cli.write(|tx, _| {
        let mut row = connections::get_tx(tx, "acme")?;
        row.conn.state = State::Disabled;
        connections::put(tx, &row)
    })
    .unwrap();
    assert_eq!(r.answer().await, None);
}

#[tokio::test]
async fn a_cached_token_is_never_served_for_a_removed_connection() {
    let r = rig();
    assert_eq!(r.answer().await.as_deref(), Some(TOKEN));
    let mut cli = r.open();
    let id = cli.get("acme").unwrap().conn.id;
    cli.write(|tx, _| connections::remove(tx, id)).unwrap();
    assert!(matches!(
        r.engine.token("acme").await,
        Err(EngineError::Store(StoreError::UnknownConnection(_)))
    ));
}

#[tokio::test]
async fn a_cached_token_is_never_served_past_its_expiry_margin() {
    let r = rig();
    assert_eq!(r.answer().await.as_deref(), Some(TOKEN));
    // One hour of lifetime, a five-minute margin: unusable after 55 minutes.
    r.clock.advance(chrono::Duration::minutes(56));
    assert_eq!(r.answer().await, None);
}

#[tokio::test]
async fn a_token_saved_elsewhere_replaces_the_cached_one() {
    let r = rig();
    assert_eq!(r.answer().await.as_deref(), Some(TOKEN));
    let mut cli = r.open();
    cli.write(|tx, kr| {
        let id = connections::get_tx(tx, "acme")?.conn.id;
        connections::set_secret(
            tx,
            kr,
            id,
            SecretColumn::AccessToken,
            Some(&Secret::new("access-token-value-2")),
        )
    })
    .unwrap();
    assert_eq!(r.answer().await.as_deref(), Some("access-token-value-2"));
}
