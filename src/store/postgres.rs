//! The store on PostgreSQL (DESIGN §10): connecting (TLS through rustls,
//! the password from its file, never from the URL), and the schema.
//!
//! The tables are SQLite's, in PostgreSQL's types ([`schema`]); every
//! statement is the same text on both engines ([`super::sql`]). Secrets are
//! sealed by acutoken before they are sent, exactly as on SQLite: the
//! server, its standbys and its backups only ever hold ciphertext.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::sql::{self, Db, Session};
use super::{StoreError, migrations};
use crate::config::{PgTarget, PgTls};

/// How long connecting may take, per host of the URL.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a statement waits for a lock (another process's write
/// transaction) before the store reports itself busy, as SQLite's busy
/// timeout does.
const LOCK_TIMEOUT: &str = "10s";

/// Opens one connection to the database `target` names. It opens a new
/// session by itself when its session ends (a restart, a failover to the
/// host `target_session_attrs` picks, a cut network), between transactions.
pub(crate) fn connect(target: &PgTarget) -> Result<Db, StoreError> {
    let session = open_session(target).map_err(StoreError::Unwritable)?;
    let again = target.clone();
    Ok(Db::postgres(
        session,
        Box::new(move || open_session(&again)),
    ))
}

/// One session: connected, its socket driven by a thread of its own (so a
/// store call may wait for its answer from any thread, async or not), and
/// set up. The error says why the database cannot be reached.
fn open_session(target: &PgTarget) -> Result<Session, String> {
    let unreachable =
        |what: String| format!("the database {} cannot be reached: {what}", target.display);
    let (config, tls) = client_config(target)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let driver = std::thread::Builder::new()
        .name("store-pg".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                macro_rules! drive {
                    ($connected:expr) => {
                        match $connected {
                            Ok((client, connection)) => {
                                let _ = tx.send(Ok(client));
                                // Ends with an error or when the client is dropped.
                                let _ = connection.await;
                            }
                            Err(e) => {
                                let _ = tx.send(Err(sql::pg_message(&e)));
                            }
                        }
                    };
                }
                match tls {
                    None => drive!(config.connect(tokio_postgres::NoTls).await),
                    Some(tls) => drive!(config.connect(tls).await),
                }
            });
        })
        .map_err(|e| unreachable(e.to_string()))?;
    let client = rx
        .recv()
        .map_err(|_| unreachable("the connection thread stopped".into()))?
        .map_err(unreachable)?;
    let session = Session { client, driver };
    let setup = format!(
        "SET lock_timeout = '{LOCK_TIMEOUT}'; SET idle_in_transaction_session_timeout = '10min'"
    );
    sql::block_on(session.client.batch_execute(&setup))
        .map_err(|e| unreachable(sql::pg_message(&e)))?;
    Ok(session)
}

/// The client's settings for `target`, and its TLS when it has one.
fn client_config(
    target: &PgTarget,
) -> Result<
    (
        tokio_postgres::Config,
        Option<tokio_postgres_rustls::MakeRustlsConnect>,
    ),
    String,
> {
    let mut config =
        tokio_postgres::Config::from_str(&target.url).map_err(|e| format!("store.url: {e}"))?;
    config
        .application_name("acutoken")
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    if let Some(password) = &target.password {
        config.password(password.expose().as_bytes());
    }
    let tls = match &target.tls {
        PgTls::Disable => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            None
        }
        PgTls::Verify { root_cert } => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                tls_config(root_cert.as_deref()).map_err(|e| e.to_string())?,
            ))
        }
    };
    Ok((config, tls))
}

/// The channel every write transaction notifies when it commits
/// ([`super::sql`]): CLI writes and the other replicas' writes reach a
/// daemon as they happen, not by polling.
pub(crate) const CHANGES: &str = "acutoken_changes";

/// How soon a listener whose session ended connects again.
const LISTEN_AGAIN: Duration = Duration::from_secs(1);

/// Listens on [`CHANGES`] from a session and a thread of its own, and
/// notifies `changed` for every notification, and once each time it starts
/// listening (what was written while it was not is then looked at). When its
/// session ends (a restart, a failover) it connects again every second.
/// Stops when dropped.
pub struct Listener {
    stop: Arc<tokio::sync::Notify>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.notify_one();
    }
}

impl super::Store {
    /// On PostgreSQL, a [`Listener`] on this store's database that notifies
    /// `changed` when anyone commits a write; `None` on SQLite (its WAL
    /// file is watched instead).
    pub fn listen_for_changes(
        &self,
        changed: Arc<tokio::sync::Notify>,
    ) -> Result<Option<Listener>, StoreError> {
        match self.target() {
            crate::config::StoreTarget::Postgres(pg) => Ok(Some(listen(pg, changed)?)),
            crate::config::StoreTarget::File(_) => Ok(None),
        }
    }
}

/// Starts a [`Listener`] on the database `target` names.
pub fn listen(
    target: &PgTarget,
    changed: Arc<tokio::sync::Notify>,
) -> Result<Listener, StoreError> {
    let (config, tls) = client_config(target).map_err(StoreError::Postgres)?;
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = Listener {
        stop: stop.clone(),
        stopped: stopped.clone(),
    };
    let shown = target.display.clone();
    std::thread::Builder::new()
        .name("store-listen".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for store changes; looking every few seconds");
                    return;
                }
            };
            runtime.block_on(async move {
                let mut failing = false;
                while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    let ended = match &tls {
                        None => {
                            let c = config.connect(tokio_postgres::NoTls).await;
                            listen_on(c, &changed, &stop).await
                        }
                        Some(tls) => {
                            let c = config.connect(tls.clone()).await;
                            listen_on(c, &changed, &stop).await
                        }
                    };
                    match ended {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(store = %shown, error = %e, "not listening for store changes; trying again every second, and looking every few seconds meanwhile");
                        }
                        Err(_) => {}
                    }
                    tokio::select! {
                        _ = stop.notified() => {}
                        _ = tokio::time::sleep(LISTEN_AGAIN) => {}
                    }
                }
            });
        })
        .map_err(|e| StoreError::Postgres(format!("cannot start the store listener: {e}")))?;
    Ok(listener)
}

/// Listens on one connection until its session ends (`Ok` once it had
/// listened) or `stop` is notified.
async fn listen_on<S, T>(
    connected: Result<
        (tokio_postgres::Client, tokio_postgres::Connection<S, T>),
        tokio_postgres::Error,
    >,
    changed: &tokio::sync::Notify,
    stop: &tokio::sync::Notify,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (client, mut connection) = connected.map_err(|e| sql::pg_message(&e))?;
    // The connection carries the notifications; it runs beside the LISTEN.
    let messages = std::future::poll_fn(|cx| {
        loop {
            match connection.poll_message(cx) {
                std::task::Poll::Ready(Some(Ok(tokio_postgres::AsyncMessage::Notification(_)))) => {
                    changed.notify_one();
                }
                std::task::Poll::Ready(Some(Ok(_))) => {}
                std::task::Poll::Ready(Some(Err(e))) => {
                    return std::task::Poll::Ready(Err(sql::pg_message(&e)));
                }
                std::task::Poll::Ready(None) => return std::task::Poll::Ready(Ok(())),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
    });
    tokio::pin!(messages);
    let statement = format!("LISTEN {CHANGES}");
    let listening = client.batch_execute(&statement);
    tokio::select! {
        ended = &mut messages => return ended.and(Err("the session ended before it listened".into())),
        listened = listening => listened.map_err(|e| sql::pg_message(&e))?,
        _ = stop.notified() => return Ok(()),
    }
    // Whatever was written while this session was not listening.
    changed.notify_one();
    tokio::select! {
        ended = &mut messages => ended,
        _ = stop.notified() => Ok(()),
    }
}

/// rustls with the Mozilla roots, or only the CA of `sslrootcert`: the
/// server's certificate and host name are always verified.
fn tls_config(root_cert: Option<&std::path::Path>) -> Result<rustls::ClientConfig, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    StoreError::Postgres(format!(
                        "store.url: sslrootcert {} does not read as PEM certificates: {e}",
                        path.display()
                    ))
                })?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    StoreError::Postgres(format!("store.url: sslrootcert {}: {e}", path.display()))
                })?;
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Postgres(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The schema version the database is at: 0 for an empty database.
pub(crate) fn version(db: &Db) -> Result<i64, StoreError> {
    let exists: bool = db.query_row(
        "SELECT to_regclass('acutoken_schema') IS NOT NULL",
        (),
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(0);
    }
    Ok(db.query_row("SELECT version FROM acutoken_schema", (), |r| r.get(0))?)
}

/// Brings the schema up to date. Every step runs under the store's write
/// lock, so two processes starting at once on an empty database run each
/// migration once: the second waits, then finds it done.
pub(crate) fn migrate(db: &Db) -> Result<(), StoreError> {
    let known = migrations::MIGRATIONS.len() as i64;
    loop {
        let tx = db.transaction_with_behavior(sql::TransactionBehavior::Immediate)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS acutoken_schema (version BIGINT NOT NULL)")?;
        let version: Option<i64> = tx
            .query_row("SELECT version FROM acutoken_schema", (), |r| r.get(0))
            .map(Some)
            .or_else(|e| if e.is_no_rows() { Ok(None) } else { Err(e) })?;
        let at = version.unwrap_or(0);
        if at >= known {
            // The replicas' tables came after the first PostgreSQL release:
            // made here, outside the versioned steps both engines share.
            let missing: bool =
                tx.query_row("SELECT to_regclass('acutoken_leases') IS NULL", (), |r| {
                    r.get(0)
                })?;
            if missing {
                tx.execute_batch(super::replicas::SCHEMA)?;
            }
            return Ok(tx.commit()?);
        }
        let step = migrations::MIGRATIONS[at as usize];
        tx.execute_batch(&schema(step))?;
        if at == 0 {
            tx.execute_batch(POSTGRES_ONLY)?;
        }
        match version {
            None => tx.execute(
                "INSERT INTO acutoken_schema (version) VALUES (?1)",
                [at + 1],
            )?,
            Some(_) => tx.execute("UPDATE acutoken_schema SET version = ?1", [at + 1])?,
        };
        tx.commit()?;
    }
}

/// What SQLite has unasked: a `rowid` on every table (the store names a
/// row whose id does not read by it), and `PRAGMA data_version`, which here
/// is a counter every write transaction moves.
const POSTGRES_ONLY: &str = "
ALTER TABLE connections ADD COLUMN rowid BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE;
INSERT INTO meta (key, value) VALUES ('data_version', 0);
";

/// A migration in PostgreSQL's types: 64-bit integers, `bytea` for sealed
/// values, an identity for SQLite's integer primary key, and names that
/// sort by their bytes as SQLite sorts them.
fn schema(sqlite: &str) -> String {
    sqlite
        .replace(
            "INTEGER PRIMARY KEY",
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        )
        .replace("INTEGER", "BIGINT")
        .replace("BLOB", "BYTEA")
        .replace(
            "name                    TEXT NOT NULL UNIQUE",
            "name TEXT COLLATE \"C\" NOT NULL UNIQUE",
        )
        // The authorization URL is sealed like a secret.
        .replace(
            "url           TEXT NOT NULL",
            "url           BYTEA NOT NULL",
        )
}

/// The serve lock: every replica holds it shared for its whole life, and
/// what must have the store to itself (`key rotate`, `store copy`) takes it
/// exclusively, so neither runs while a replica serves. "acutokes" in
/// ASCII, apart from the write lock.
const SERVE_LOCK: i64 = 0x6163_7574_6f6b_6573;

/// The first key of a replica's name lock ("acut"); the second is
/// [`name_key`]. Two live replicas with one name would be one replica's
/// claims and heartbeats written by two processes.
const REPLICA_NS: i32 = 0x6163_7574;

/// The second key of the name lock of replica `name`.
fn name_key(name: &str) -> i32 {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(name.as_bytes());
    i32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// How a [`ServeLock`] holds the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// The store alone: no replica serves it meanwhile.
    Alone,
    /// As the replica of this name, beside any others.
    Replica(String),
}

/// A session-level advisory lock on a connection of its own, released when
/// the session ends (a dead process's session ends with it). Claims keep
/// every refresh safe across processes whatever this lock says; it keeps
/// two replicas from sharing a name, and the store's exclusive operations
/// from running under a replica.
pub struct ServeLock {
    db: Db,
    display: String,
    hold: Hold,
}

impl std::fmt::Debug for ServeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServeLock({}, {:?})", self.display, self.hold)
    }
}

impl ServeLock {
    /// Takes the lock as `hold` says, naming this process as its holder
    /// (`holder` shows in the refusal another process gets, and in
    /// `pg_stat_activity`).
    pub fn acquire(target: &PgTarget, holder: &str, hold: Hold) -> Result<ServeLock, StoreError> {
        let db = connect(target)?;
        // The holder is set as the session's application name, where a
        // refused process reads it.
        let who = match &hold {
            Hold::Alone => holder.to_string(),
            Hold::Replica(name) => format!("{name}: {holder}"),
        };
        db.execute_batch(&format!(
            "SET application_name = 'acutoken serve {}'",
            who.replace('\'', "")
        ))?;
        let lock = ServeLock {
            db,
            display: target.display.clone(),
            hold,
        };
        let got: bool = match &lock.hold {
            Hold::Alone => {
                lock.db
                    .query_row("SELECT pg_try_advisory_lock(?1)", [SERVE_LOCK], |r| {
                        r.get(0)
                    })?
            }
            Hold::Replica(_) => lock.db.query_row(
                "SELECT pg_try_advisory_lock_shared(?1)",
                [SERVE_LOCK],
                |r| r.get(0),
            )?,
        };
        if !got {
            return Err(StoreError::Served {
                store: target.display.clone(),
                holder: holder_of(&lock.db, None)?
                    .unwrap_or_else(|| "a session this role cannot see".into()),
            });
        }
        if let Hold::Replica(name) = &lock.hold {
            let key = name_key(name);
            let got: bool = lock.db.query_row(
                "SELECT pg_try_advisory_lock((?1::bigint)::int4, (?2::bigint)::int4)",
                [i64::from(REPLICA_NS), i64::from(key)],
                |r| r.get(0),
            )?;
            if !got {
                return Err(StoreError::ReplicaNameTaken {
                    store: target.display.clone(),
                    name: name.clone(),
                    holder: holder_of(&lock.db, Some(key))?
                        .unwrap_or_else(|| "a session this role cannot see".into()),
                });
            }
        }
        Ok(lock)
    }

    /// True while this lock's session is alive and holds it. Asked of the
    /// server, not assumed: a session that ended (and was renewed) lost it.
    pub fn is_held(&self) -> bool {
        if self.db.is_closed() {
            return false;
        }
        let (want, name) = match &self.hold {
            Hold::Alone => (1, 0),
            Hold::Replica(name) => (2, i64::from(name_key(name) as u32)),
        };
        self.db
            .query_row(
                "SELECT COUNT(*) FROM pg_locks WHERE pid = pg_backend_pid()
                   AND locktype = 'advisory' AND granted
                   AND ((classid::bigint = ?1 AND objid::bigint = ?2 AND objsubid = 1)
                     OR (classid::bigint = ?3 AND objid::bigint = ?4 AND objsubid = 2))",
                [
                    SERVE_LOCK >> 32,
                    SERVE_LOCK & 0xffff_ffff,
                    i64::from(REPLICA_NS),
                    name,
                ],
                |r| r.get::<_, i64>(0),
            )
            .is_ok_and(|n| n == want)
    }

    /// How this lock holds the store.
    pub fn hold(&self) -> &Hold {
        &self.hold
    }
}

/// Who holds the serve lock (or, with `name`, the name lock of that key) of
/// the database `db` is connected to: the application name and address of
/// a session holding it, if this role may see it.
fn holder_of(db: &Db, name: Option<i32>) -> Result<Option<String>, StoreError> {
    let (classid, objid, sub) = match name {
        None => (SERVE_LOCK >> 32, SERVE_LOCK & 0xffff_ffff, 1),
        Some(key) => (i64::from(REPLICA_NS), i64::from(key as u32), 2),
    };
    let row: Option<(Option<String>, Option<String>)> = {
        use super::sql::OptionalExtension;
        db.query_row(
            "SELECT a.application_name, host(a.client_addr)
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid::bigint = ?1 AND l.objid::bigint = ?2 AND l.objsubid = ?3
             ORDER BY a.backend_start LIMIT 1",
            [classid, objid, sub],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
    };
    Ok(row.map(|(name, addr)| {
        let name = name.unwrap_or_default();
        match addr {
            Some(a) => format!("{name} from {a}"),
            None => format!("{name} on the database host"),
        }
    }))
}

/// True when some replica (or an exclusive operation) holds the serve lock of `target`.
pub fn served(target: &PgTarget) -> Result<bool, StoreError> {
    // Looked up, not tried: taking the lock even for a moment would refuse
    // a replica starting in that moment.
    let db = connect(target)?;
    Ok(db.query_row(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND classid::bigint = ?1 AND objid::bigint = ?2 AND objsubid = 1)",
        [SERVE_LOCK >> 32, SERVE_LOCK & 0xffff_ffff],
        |r| r.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use super::{Hold, schema};
    use crate::config::StoreTarget;
    use crate::store::{Create, Store, testing};

    fn ends_every_session_of(target: &StoreTarget) {
        let StoreTarget::Postgres(pg) = target else {
            unreachable!("a PostgreSQL target")
        };
        let db_name = pg.display.rsplit('/').next().unwrap().to_string();
        let admin = testing::admin();
        let ended: i64 = admin
            .query_row(
                "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = ?1 AND pid <> pg_backend_pid()) AS t",
                [db_name],
                |r| r.get(0),
            )
            .unwrap();
        assert!(ended > 0, "the store's sessions were found and ended");
    }

    /// A session the server ended (a restart, a failover) is replaced
    /// between transactions: at most the statement in flight fails, as a
    /// store that cannot be written, and nothing written is lost.
    #[test]
    fn a_store_opens_a_new_session_when_its_session_ends() {
        let target = testing::postgres_target();
        let keyring = crate::crypto::Keyring::new(crate::crypto::Key::generate(), vec![]);
        let mut st = testing::open(&target, keyring, Create::Yes).unwrap();
        st.write(|tx, _| Ok(tx.execute("INSERT INTO meta (key, value) VALUES ('kept', 7)", ())?))
            .unwrap();
        ends_every_session_of(&target);
        let mut failures = 0;
        let kept = loop {
            match st
                .db()
                .query_row("SELECT value FROM meta WHERE key = 'kept'", (), |r| {
                    r.get::<_, i64>(0)
                }) {
                Ok(v) => break v,
                Err(e) => {
                    let e = crate::store::StoreError::from(e);
                    assert!(e.is_unwritable(), "an outage, not another error: {e}");
                    failures += 1;
                    assert!(failures < 100, "no new session after {failures} tries: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        };
        assert_eq!(kept, 7);
        assert!(
            failures <= 1,
            "only the statement in flight fails ({failures})"
        );
        st.write(|tx, _| Ok(tx.execute("UPDATE meta SET value = 8 WHERE key = 'kept'", ())?))
            .unwrap();
    }

    /// The serve lock is the session's: once its session ends it is no
    /// longer held, and another daemon may take it.
    #[test]
    fn the_serve_lock_is_lost_with_its_session_and_can_be_taken_again() {
        let target = testing::postgres_target();
        let keyring = crate::store::SharedKeyring::new(crate::crypto::Keyring::new(
            crate::crypto::Key::generate(),
            vec![],
        ));
        drop(Store::open_target(&target, &keyring, Create::Yes).unwrap());
        let StoreTarget::Postgres(pg) = &target else {
            unreachable!()
        };
        let lock = super::ServeLock::acquire(pg, "first", Hold::Alone).unwrap();
        assert!(lock.is_held());
        let refused = super::ServeLock::acquire(pg, "second", Hold::Alone).unwrap_err();
        assert!(
            refused.to_string().contains("acutoken serve first"),
            "{refused}"
        );
        assert!(super::served(pg).unwrap());
        ends_every_session_of(&target);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lock.is_held() {
            assert!(
                std::time::Instant::now() < deadline,
                "still held after its session ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let again = super::ServeLock::acquire(pg, "second", Hold::Alone).unwrap();
        assert!(again.is_held());
    }

    /// Replicas share the store, one per name; what needs the store alone
    /// waits for every replica to stop, and no replica starts under it.
    #[test]
    fn replicas_share_the_serve_lock_one_per_name() {
        let target = testing::postgres_target();
        let keyring = crate::store::SharedKeyring::new(crate::crypto::Keyring::new(
            crate::crypto::Key::generate(),
            vec![],
        ));
        drop(Store::open_target(&target, &keyring, Create::Yes).unwrap());
        let StoreTarget::Postgres(pg) = &target else {
            unreachable!()
        };
        let replica = |name: &str| Hold::Replica(name.into());
        let a = super::ServeLock::acquire(pg, "pid 1", replica("a")).unwrap();
        let b = super::ServeLock::acquire(pg, "pid 2", replica("b")).unwrap();
        assert!(a.is_held() && b.is_held());
        let twin = super::ServeLock::acquire(pg, "pid 3", replica("a")).unwrap_err();
        assert!(
            matches!(&twin, crate::store::StoreError::ReplicaNameTaken { name, holder, .. }
                if name == "a" && holder.contains("pid 1")),
            "{twin}"
        );
        let alone = super::ServeLock::acquire(pg, "rotate", Hold::Alone).unwrap_err();
        assert!(
            matches!(alone, crate::store::StoreError::Served { .. }),
            "{alone}"
        );
        assert!(super::served(pg).unwrap());
        drop((a, b));
        let alone = super::ServeLock::acquire(pg, "rotate", Hold::Alone).unwrap();
        let refused = super::ServeLock::acquire(pg, "pid 4", replica("c")).unwrap_err();
        assert!(
            refused.to_string().contains("acutoken serve rotate"),
            "{refused}"
        );
        drop(alone);
        assert!(!super::served(pg).unwrap());
    }

    /// Writes reach a listener as notifications, from any session, and a
    /// listener whose session ended listens again by itself.
    #[tokio::test]
    async fn a_listener_hears_every_commit_and_listens_again_after_its_session_ended() {
        let target = testing::postgres_target();
        let keyring = crate::crypto::Keyring::new(crate::crypto::Key::generate(), vec![]);
        let mut writer = testing::open(&target, keyring.clone(), Create::Yes).unwrap();
        let reader = testing::open(&target, keyring, Create::No).unwrap();
        let changed = std::sync::Arc::new(tokio::sync::Notify::new());
        let _listener = reader
            .listen_for_changes(changed.clone())
            .unwrap()
            .expect("a PostgreSQL store has a listener");
        let heard = |what: &'static str| {
            let changed = changed.clone();
            async move {
                tokio::time::timeout(std::time::Duration::from_secs(20), changed.notified())
                    .await
                    .unwrap_or_else(|_| panic!("{what}: no notification"));
            }
        };
        heard("listening").await;
        let write = |w: &mut Store, v: i64| {
            w.write(|tx, _| {
                Ok(tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('n', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [v],
                )?)
            })
            .unwrap()
        };
        write(&mut writer, 1);
        heard("a commit").await;
        // A read-only transaction notifies nobody: nothing to look at.
        reader
            .db()
            .query_row("SELECT 1", (), |r| r.get::<_, i64>(0))
            .unwrap();

        ends_every_session_of(&target);
        // Listening again notifies once (what was written meanwhile).
        heard("listening again").await;
        let mut tries = 0;
        loop {
            match writer
                .write(|tx, _| Ok(tx.execute("UPDATE meta SET value = 2 WHERE key = 'n'", ())?))
            {
                Ok(_) => break,
                Err(e) => {
                    assert!(e.is_unwritable(), "{e}");
                    tries += 1;
                    assert!(tries < 3, "the writer's session is replaced: {e}");
                }
            }
        }
        heard("a commit after the restart").await;
    }

    /// A process stopped inside a write transaction (a replica paused with
    /// SIGSTOP) does not hold every other writer's lock: the server ends its
    /// session, the others write, and its own transaction fails as an
    /// interrupted write.
    #[test]
    fn a_writer_stopped_inside_its_transaction_does_not_stop_the_others() {
        let target = testing::postgres_target();
        let keyring = crate::crypto::Keyring::new(crate::crypto::Key::generate(), vec![]);
        let stopped = testing::open(&target, keyring.clone(), Create::Yes).unwrap();
        let mut other = testing::open(&target, keyring, Create::No).unwrap();
        let tx = stopped
            .db()
            .transaction_with_behavior(super::sql::TransactionBehavior::Immediate)
            .unwrap();
        // `stopped` sends nothing more; the other writer waits for the write
        // lock (up to the 10 s lock timeout) and gets it when the server
        // ends the idle session.
        other
            .write(|tx, _| Ok(tx.execute("INSERT INTO meta (key, value) VALUES ('w', 1)", ())?))
            .unwrap();
        let e = crate::store::StoreError::from(
            tx.execute("INSERT INTO meta (key, value) VALUES ('late', 1)", ())
                .unwrap_err(),
        );
        assert!(e.is_unwritable(), "{e}");
    }

    /// A write that could not have the write lock within the lock timeout
    /// fails alone: the same connection writes again once the lock is free
    /// (its transaction is not left open and aborted on the server).
    #[test]
    fn a_write_refused_for_the_lock_leaves_its_connection_usable() {
        let target = testing::postgres_target();
        let keyring = crate::crypto::Keyring::new(crate::crypto::Key::generate(), vec![]);
        let mut st = testing::open(&target, keyring.clone(), Create::Yes).unwrap();
        let holder = testing::open(&target, keyring, Create::No).unwrap();
        let lock = super::sql::WRITE_LOCK;
        holder
            .db()
            .query_row("SELECT pg_advisory_lock(?1)::text", [lock], |r| {
                r.get::<_, String>(0)
            })
            .unwrap();
        let insert = |st: &mut Store| {
            st.write(|tx, _| Ok(tx.execute("INSERT INTO meta (key, value) VALUES ('x', 1)", ())?))
        };
        let refused = insert(&mut st).unwrap_err();
        assert!(
            matches!(refused, crate::store::StoreError::Busy),
            "{refused}"
        );
        holder
            .db()
            .query_row("SELECT pg_advisory_unlock(?1)", [lock], |r| {
                r.get::<_, bool>(0)
            })
            .unwrap();
        insert(&mut st).unwrap();
    }

    #[test]
    fn the_schema_uses_postgres_types_and_byte_order_for_names() {
        let s = schema(super::migrations::MIGRATIONS[0]);
        assert!(!s.contains("INTEGER") && !s.contains("BLOB"), "{s}");
        assert!(s.contains("id            BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"));
        assert!(s.contains("name TEXT COLLATE \"C\" NOT NULL UNIQUE"), "{s}");
        assert!(s.contains("url           BYTEA NOT NULL"), "{s}");
    }
}
