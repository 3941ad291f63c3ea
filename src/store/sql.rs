//! One SQL interface over the two engines: SQLite (rusqlite) and PostgreSQL
//! (`tokio-postgres`, its socket driven by a thread of its own). Every statement of the store is
//! written once, in the dialect both accept, and runs through [`Db`].
//!
//! The interface keeps rusqlite's shape (`prepare_cached`, `query_row`,
//! `Rows::next`, `Row::get`), so the store's code reads the same whichever
//! engine is behind it, and rusqlite's value vocabulary: parameters are
//! `rusqlite::ToSql`, columns are read through `rusqlite::types::FromSql`
//! from a [`ValueRef`] that PostgreSQL rows are turned into too. A column
//! that does not decode is therefore the same error on both engines, which
//! is what turns a hand-edited row into a fault naming its column.
//!
//! On PostgreSQL, `?N` placeholders become `$N`, every write transaction
//! takes one advisory lock (the writers of a store run one at a time, as
//! SQLite's `BEGIN IMMEDIATE` makes them, so every read-decide-write in a
//! transaction sees no other writer between its read and its write), and
//! statements are prepared once per connection.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

pub use rusqlite::ToSql;
pub use rusqlite::TransactionBehavior;
pub use rusqlite::types::{FromSql, Value, ValueRef};
use tokio_postgres::types::{IsNull, ToSql as PgToSql, Type, to_sql_checked};

/// The advisory lock every PostgreSQL write transaction holds until it
/// ends: "acutoken" in ASCII, so it is recognisable in `pg_locks`.
pub(crate) const WRITE_LOCK: i64 = 0x6163_7574_6f6b_656e;

/// The longest a write transaction may wait on its client between two
/// statements (see [`Db::transaction_with_behavior`]). The store's writes
/// send their statements back to back; only a stopped process waits longer.
const WRITE_IDLE_MAX: &str = "5s";

/// Moves the data version (see [`Transaction::commit`]) and tells the
/// listeners of [`super::postgres::CHANGES`], at commit.
const DATA_VERSION_BUMP: &str =
    "UPDATE meta SET value = value + 1 WHERE key = 'data_version'; NOTIFY acutoken_changes";

/// Statements kept prepared per PostgreSQL connection before the cache is
/// emptied (the store has a few dozen distinct statements).
const PG_STATEMENTS: usize = 512;

/// A failure of either engine. Reading a column is reported in rusqlite's
/// words on both (`InvalidColumnType`, `FromSqlConversionFailure`), and so
/// is a `query_row` that found no row (`QueryReturnedNoRows`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", pg_message(.0))]
    Pg(#[from] tokio_postgres::Error),
    /// A statement was sent while the rows of another were unread (a bug:
    /// on PostgreSQL it would wait forever).
    #[error("a statement was sent while the rows of another were being read")]
    Nested,
    /// No PostgreSQL session could be opened.
    #[error("{0}")]
    Unreachable(String),
    /// A PostgreSQL transaction an earlier statement aborted: its commit
    /// would have been a rollback.
    #[error("the transaction was aborted by an earlier error and rolled back")]
    Aborted,
}

/// A PostgreSQL error in one line: the server's message (with its detail),
/// or the client's. Parameters are never part of it.
pub(crate) fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        },
        // The client's own words are terse ("error serializing parameter
        // 4"); the cause says what.
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A unique or primary-key constraint refused the write.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Error::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            Error::Pg(e) => e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }

    /// `query_row` found no row.
    pub fn is_no_rows(&self) -> bool {
        matches!(self, Error::Sqlite(rusqlite::Error::QueryReturnedNoRows))
    }
}

/// `optional()` on a `query_row`: no row is `Ok(None)`.
pub trait OptionalExtension<T, E> {
    fn optional(self) -> std::result::Result<Option<T>, E>;
}

impl<T> OptionalExtension<T, Error> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_no_rows() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl<T> OptionalExtension<T, rusqlite::Error> for rusqlite::Result<T> {
    fn optional(self) -> rusqlite::Result<Option<T>> {
        rusqlite::OptionalExtension::optional(self)
    }
}

/// The parameters of one statement: `params![..]`, an array of values, or
/// `()` for none.
pub trait Params {
    fn values(&self) -> Vec<&dyn ToSql>;
}

impl Params for () {
    fn values(&self) -> Vec<&dyn ToSql> {
        Vec::new()
    }
}

impl Params for &[&dyn ToSql] {
    fn values(&self) -> Vec<&dyn ToSql> {
        self.to_vec()
    }
}

impl Params for Vec<&dyn ToSql> {
    fn values(&self) -> Vec<&dyn ToSql> {
        self.clone()
    }
}

impl<T: ToSql, const N: usize> Params for [T; N] {
    fn values(&self) -> Vec<&dyn ToSql> {
        self.iter().map(|v| v as &dyn ToSql).collect()
    }
}

impl<T: ToSql, const N: usize> Params for &[T; N] {
    fn values(&self) -> Vec<&dyn ToSql> {
        self.iter().map(|v| v as &dyn ToSql).collect()
    }
}

/// Which engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// One connection to the store's database.
pub struct Db(Conn);

enum Conn {
    Sqlite(rusqlite::Connection),
    Pg(Box<Pg>),
}

/// Opens a new session: the client, and the thread that drives its socket.
pub(crate) type Connect = Box<dyn Fn() -> std::result::Result<Session, String> + Send + 'static>;

/// A PostgreSQL session: its client and the thread driving its socket
/// (which ends when the client is dropped).
pub(crate) struct Session {
    pub client: tokio_postgres::Client,
    pub driver: std::thread::JoinHandle<()>,
}

pub(crate) struct Pg {
    session: RefCell<Session>,
    /// How to open a new session when this one has ended (the server
    /// restarted, failed over, or the network cut it). Only between
    /// transactions: a transaction that lost its session has failed.
    connect: Connect,
    /// A transaction is open on this session.
    in_tx: Cell<bool>,
    /// Queries whose rows are still being read. The session answers in
    /// order, and a query's rows are handed over one message at a time: a
    /// second statement sent before they are all read would wait forever
    /// behind them. The store never does that; if it ever did, the second
    /// statement fails at once instead.
    reading: Cell<usize>,
    statements: RefCell<HashMap<String, tokio_postgres::Statement>>,
    /// Inside a transaction, a statement failed and no savepoint has been
    /// rolled back to since: PostgreSQL refuses everything but a rollback.
    aborted: Cell<bool>,
}

impl Db {
    pub fn sqlite(conn: rusqlite::Connection) -> Db {
        Db(Conn::Sqlite(conn))
    }

    /// A PostgreSQL connection: `session`, renewed through `connect`.
    pub(crate) fn postgres(session: Session, connect: Connect) -> Db {
        Db(Conn::Pg(Box::new(Pg {
            session: RefCell::new(session),
            connect,
            in_tx: Cell::new(false),
            reading: Cell::new(0),
            statements: RefCell::new(HashMap::new()),
            aborted: Cell::new(false),
        })))
    }

    pub fn engine(&self) -> Engine {
        match &self.0 {
            Conn::Sqlite(_) => Engine::Sqlite,
            Conn::Pg(_) => Engine::Postgres,
        }
    }

    /// The SQLite connection itself, for what only SQLite has (pragmas,
    /// `VACUUM INTO`); `None` on PostgreSQL.
    pub fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.0 {
            Conn::Sqlite(c) => Some(c),
            Conn::Pg(_) => None,
        }
    }

    /// Runs `sql` (several statements, no parameters).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match &self.0 {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Pg(pg) => pg.batch(sql),
        }
    }

    pub fn execute<P: Params>(&self, sql: &str, params: P) -> Result<usize> {
        self.prepare(sql)?.execute(params)
    }

    pub fn query_row<T, P, F>(&self, sql: &str, params: P, f: F) -> Result<T>
    where
        P: Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare(sql)?.query_row(params, f)
    }

    /// A statement prepared once per connection and kept.
    pub fn prepare_cached(&self, sql: &str) -> Result<Statement<'_>> {
        match &self.0 {
            Conn::Sqlite(c) => Ok(Statement(Stmt::SqliteCached(c.prepare_cached(sql)?))),
            Conn::Pg(pg) => pg.statement(sql),
        }
    }

    /// A statement for this one use (on PostgreSQL kept too: the server
    /// prepares it once either way).
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_>> {
        match &self.0 {
            Conn::Sqlite(c) => Ok(Statement(Stmt::Sqlite(c.prepare(sql)?))),
            Conn::Pg(pg) => pg.statement(sql),
        }
    }

    /// Writes many rows into `table` at once: `values` holds the rows one
    /// after the other, `columns.len()` values each. PostgreSQL takes them
    /// through `COPY ... FROM STDIN` in its binary format (one round trip
    /// for all of them); SQLite through INSERTs of many rows each.
    pub fn copy_in(&self, table: &str, columns: &[&str], values: &[Value]) -> Result<u64> {
        let width = columns.len();
        let cols = columns.join(", ");
        match &self.0 {
            Conn::Sqlite(_) => {
                const ROWS: usize = 100;
                for chunk in values.chunks(width * ROWS) {
                    let one = format!("({})", vec!["?"; width].join(", "));
                    let sql = format!(
                        "INSERT INTO {table} ({cols}) VALUES {}",
                        vec![one; chunk.len() / width].join(", ")
                    );
                    let params: Vec<&dyn ToSql> = chunk.iter().map(|v| v as &dyn ToSql).collect();
                    self.prepare_cached(&sql)?.execute(params)?;
                }
                Ok((values.len() / width.max(1)) as u64)
            }
            Conn::Pg(pg) => pg.copy_in(table, &cols, width, values),
        }
    }

    /// Begins a transaction. `Immediate` takes the store's write lock at
    /// once: SQLite's reserved lock, or PostgreSQL's advisory lock
    /// [`WRITE_LOCK`], held until the transaction ends.
    pub fn transaction_with_behavior(
        &self,
        behavior: TransactionBehavior,
    ) -> Result<Transaction<'_>> {
        match &self.0 {
            Conn::Sqlite(c) => {
                c.execute_batch(match behavior {
                    TransactionBehavior::Immediate => "BEGIN IMMEDIATE",
                    TransactionBehavior::Exclusive => "BEGIN EXCLUSIVE",
                    _ => "BEGIN DEFERRED",
                })?;
            }
            Conn::Pg(pg) => {
                pg.aborted.set(false);
                match behavior {
                    TransactionBehavior::Deferred => {
                        pg.batch("BEGIN ISOLATION LEVEL REPEATABLE READ")?
                    }
                    // A process stopped inside a write transaction (a
                    // replica paused with SIGSTOP, swapped out, cut off)
                    // would hold the write lock of every replica: the
                    // server ends its session once it has idled inside the
                    // transaction for WRITE_IDLE_MAX, and its transaction
                    // fails like any interrupted write.
                    _ => pg.batch(&format!(
                        "BEGIN; SET LOCAL idle_in_transaction_session_timeout = '{WRITE_IDLE_MAX}'; \
                         SELECT pg_advisory_xact_lock({WRITE_LOCK})"
                    ))?,
                }
            }
        }
        Ok(Transaction {
            db: self,
            open: Cell::new(true),
            writes: !matches!(behavior, TransactionBehavior::Deferred),
        })
    }

    /// A read transaction on `&self`: one snapshot for every statement in
    /// it (SQLite's deferred transaction; PostgreSQL's repeatable read).
    pub fn unchecked_transaction(&self) -> Result<Transaction<'_>> {
        self.transaction_with_behavior(TransactionBehavior::Deferred)
    }

    /// Sets one of SQLite's per-connection knobs (journal mode, cache size
    /// and the like). PostgreSQL has no such knob: the server's own
    /// settings decide, and this does nothing there.
    pub fn pragma_update<V: ToSql>(&self, name: &str, value: V) -> Result<()> {
        match &self.0 {
            Conn::Sqlite(c) => Ok(c.pragma_update(None, name, value)?),
            Conn::Pg(_) => Ok(()),
        }
    }

    /// True when no transaction is open (on PostgreSQL: when the connection
    /// is gone, which ended any transaction it had).
    pub fn is_autocommit(&self) -> bool {
        match &self.0 {
            Conn::Sqlite(c) => c.is_autocommit(),
            Conn::Pg(pg) => pg.session.borrow().client.is_closed(),
        }
    }

    /// Closes the connection, reporting what closing it found (SQLite
    /// checkpoints and removes its WAL here).
    pub fn close(self) -> Result<()> {
        match self.0 {
            Conn::Sqlite(c) => c.close().map_err(|(_, e)| e.into()),
            Conn::Pg(pg) => {
                let Session { client, driver } = pg.session.into_inner();
                drop(client);
                let _ = driver.join();
                Ok(())
            }
        }
    }

    /// True when the PostgreSQL connection is gone (always false for SQLite).
    pub fn is_closed(&self) -> bool {
        match &self.0 {
            Conn::Sqlite(_) => false,
            Conn::Pg(pg) => pg.session.borrow().client.is_closed(),
        }
    }
}

impl Pg {
    /// Refuses a statement while the rows of another are unread (see `reading`).
    fn one_at_a_time(&self) -> Result<()> {
        if self.reading.get() > 0 {
            debug_assert!(false, "a statement while the rows of another are unread");
            return Err(Error::Nested);
        }
        Ok(())
    }

    /// A new session in place of one that ended, between transactions.
    fn ensure_session(&self) -> Result<()> {
        if self.in_tx.get() || !self.session.borrow().client.is_closed() {
            return Ok(());
        }
        let fresh = (self.connect)().map_err(Error::Unreachable)?;
        // The old session's prepared statements went with it.
        self.statements.borrow_mut().clear();
        self.aborted.set(false);
        drop(self.session.replace(fresh));
        Ok(())
    }

    fn batch(&self, sql: &str) -> Result<()> {
        let begins = sql.starts_with("BEGIN");
        let ends = sql == "COMMIT" || sql == "ROLLBACK";
        if begins {
            self.in_tx.set(false);
        }
        self.one_at_a_time()?;
        self.ensure_session()?;
        let out = block_on(self.session.borrow().client.batch_execute(sql));
        match &out {
            Ok(()) if sql.starts_with("ROLLBACK TO") => self.aborted.set(false),
            Ok(()) => {}
            Err(_) => self.aborted.set(true),
        }
        if begins {
            self.in_tx.set(out.is_ok());
            if out.is_err() {
                // A transaction that failed as it began (the write lock not
                // had within the lock timeout) is still open on the server,
                // aborted: every later statement of this session would fail
                // until it is rolled back.
                let _ = block_on(self.session.borrow().client.batch_execute("ROLLBACK"));
                self.aborted.set(false);
            }
        }
        if ends {
            self.in_tx.set(false);
        }
        Ok(out?)
    }

    fn statement(&self, sql: &str) -> Result<Statement<'_>> {
        self.one_at_a_time()?;
        self.ensure_session()?;
        let text = to_postgres(sql);
        let cached = self.statements.borrow().get(&text).cloned();
        let stmt = match cached {
            Some(s) => s,
            None => {
                let s = block_on(self.session.borrow().client.prepare(&text))
                    .inspect_err(|_| self.aborted.set(true))?;
                let mut cache = self.statements.borrow_mut();
                if cache.len() >= PG_STATEMENTS {
                    cache.clear();
                }
                cache.insert(text, s.clone());
                s
            }
        };
        Ok(Statement(Stmt::Pg {
            pg: self,
            stmt,
            bound: Vec::new(),
        }))
    }

    fn copy_in(&self, table: &str, cols: &str, width: usize, values: &[Value]) -> Result<u64> {
        self.one_at_a_time()?;
        self.ensure_session()?;
        // The columns' types, which the binary format must name.
        let probe = match self
            .statement(&format!("SELECT {cols} FROM {table} LIMIT 0"))?
            .0
        {
            Stmt::Pg { stmt, .. } => stmt,
            _ => unreachable!("a PostgreSQL statement"),
        };
        let types: Vec<Type> = probe.columns().iter().map(|c| c.type_().clone()).collect();
        let session = self.session.borrow();
        let copied = (|| {
            let sink = block_on(session.client.copy_in::<_, bytes::Bytes>(&format!(
                "COPY {table} ({cols}) FROM STDIN (FORMAT binary)"
            )))?;
            let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
            let mut writer = std::pin::pin!(writer);
            for row in values.chunks(width) {
                let refs: Vec<PgRef<'_>> = row.iter().map(PgRef).collect();
                let params: Vec<&(dyn PgToSql + Sync)> =
                    refs.iter().map(|p| p as &(dyn PgToSql + Sync)).collect();
                block_on(writer.as_mut().write(&params))?;
            }
            block_on(writer.as_mut().finish())
        })();
        Ok(copied.inspect_err(|_| self.aborted.set(true))?)
    }

    /// Runs a query whose rows arrive as they are read: a scan of a
    /// million rows never sits in memory whole, as on SQLite.
    fn run(
        &self,
        stmt: &tokio_postgres::Statement,
        values: &[&dyn ToSql],
    ) -> Result<std::pin::Pin<Box<tokio_postgres::RowStream>>> {
        self.one_at_a_time()?;
        let params = pg_params(values)?;
        let refs = params.iter().map(|p| p as &(dyn PgToSql + Sync));
        let rows = Box::pin(
            block_on(self.session.borrow().client.query_raw(stmt, refs))
                .inspect_err(|_| self.aborted.set(true))?,
        );
        self.reading.set(self.reading.get() + 1);
        Ok(rows)
    }

    fn execute(&self, stmt: &tokio_postgres::Statement, values: &[&dyn ToSql]) -> Result<usize> {
        self.one_at_a_time()?;
        let params = pg_params(values)?;
        let refs: Vec<&(dyn PgToSql + Sync)> =
            params.iter().map(|p| p as &(dyn PgToSql + Sync)).collect();
        let n = block_on(self.session.borrow().client.execute(stmt, &refs))
            .inspect_err(|_| self.aborted.set(true))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}

/// Waits for `f` on this thread. The client's futures only wait on the
/// channel to the connection's own thread, so any thread may wait on them:
/// a store call blocks its caller on PostgreSQL as it does on SQLite.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Wake};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::sync::Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// An open transaction; rolled back when dropped without [`commit`](Transaction::commit).
pub struct Transaction<'c> {
    db: &'c Db,
    open: Cell<bool>,
    /// Began as a write transaction.
    writes: bool,
}

impl std::ops::Deref for Transaction<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db
    }
}

impl Transaction<'_> {
    pub fn commit(self) -> Result<()> {
        self.open.set(false);
        if let Conn::Pg(pg) = &self.db.0
            && pg.aborted.get()
        {
            // PostgreSQL would answer COMMIT with a silent rollback.
            let _ = pg.batch("ROLLBACK");
            return Err(Error::Aborted);
        }
        if let Conn::Pg(pg) = &self.db.0
            && self.writes
        {
            // SQLite's `data_version` in PostgreSQL: every write transaction
            // moves it, so a reader's cache knows the store changed.
            pg.batch(DATA_VERSION_BUMP)?;
        }
        self.db.execute_batch("COMMIT")
    }

    /// Ends the transaction now, discarding its writes (after a failure
    /// that ended it on SQLite and aborted it on PostgreSQL), so the
    /// caller can look at the store as it stands.
    pub fn roll_back_now(&self) {
        if self.open.replace(false) {
            let _ = self.db.execute_batch("ROLLBACK");
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.open.get() {
            let _ = self.db.execute_batch("ROLLBACK");
        }
    }
}

/// A prepared statement.
pub struct Statement<'c>(Stmt<'c>);

enum Stmt<'c> {
    SqliteCached(rusqlite::CachedStatement<'c>),
    Sqlite(rusqlite::Statement<'c>),
    Pg {
        pg: &'c Pg,
        stmt: tokio_postgres::Statement,
        /// Values bound one by one ([`Statement::raw_bind_parameter`]).
        bound: Vec<Value>,
    },
}

impl<'c> Statement<'c> {
    fn sqlite(&mut self) -> Option<&mut rusqlite::Statement<'c>> {
        match &mut self.0 {
            Stmt::SqliteCached(s) => Some(s),
            Stmt::Sqlite(s) => Some(s),
            Stmt::Pg { .. } => None,
        }
    }

    pub fn execute<P: Params>(&mut self, params: P) -> Result<usize> {
        let values = params.values();
        match &mut self.0 {
            Stmt::Pg { pg, stmt, .. } => pg.execute(stmt, &values),
            _ => Ok(self
                .sqlite()
                .expect("a SQLite statement")
                .execute(rusqlite::params_from_iter(values))?),
        }
    }

    pub fn query<P: Params>(&mut self, params: P) -> Result<Rows<'_>> {
        let values = params.values();
        match &mut self.0 {
            Stmt::Pg { pg, stmt, .. } => Ok(Rows(RowsOf::Pg {
                pg,
                rows: pg.run(stmt, &values)?,
                current: None,
                done: false,
            })),
            Stmt::SqliteCached(s) => Ok(Rows(RowsOf::Sqlite(
                s.query(rusqlite::params_from_iter(values))?,
            ))),
            Stmt::Sqlite(s) => Ok(Rows(RowsOf::Sqlite(
                s.query(rusqlite::params_from_iter(values))?,
            ))),
        }
    }

    pub fn query_row<T, P, F>(&mut self, params: P, f: F) -> Result<T>
    where
        P: Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        let mut rows = self.query(params)?;
        match rows.next()? {
            Some(r) => Ok(f(&r)?),
            None => Err(Error::Sqlite(rusqlite::Error::QueryReturnedNoRows)),
        }
    }

    /// Every row through `f`.
    pub fn query_map<T, P, F>(&mut self, params: P, f: F) -> Result<MappedRows<'_, F>>
    where
        P: Params,
        F: FnMut(&Row<'_>) -> rusqlite::Result<T>,
    {
        Ok(MappedRows {
            rows: self.query(params)?,
            f,
        })
    }

    /// True when the query returns at least one row.
    pub fn exists<P: Params>(&mut self, params: P) -> Result<bool> {
        Ok(self.query(params)?.next()?.is_some())
    }

    /// Binds parameter `i` (from 1) for [`raw_execute`](Statement::raw_execute).
    pub fn raw_bind_parameter<T: ToSql + ?Sized>(&mut self, i: usize, value: &T) -> Result<()> {
        match &mut self.0 {
            Stmt::Pg { bound, .. } => {
                if bound.len() < i {
                    bound.resize(i, Value::Null);
                }
                bound[i - 1] = owned(value)?;
                Ok(())
            }
            _ => Ok(self
                .sqlite()
                .expect("a SQLite statement")
                .raw_bind_parameter(i, value)?),
        }
    }

    /// Runs the statement with the values bound by `raw_bind_parameter`.
    pub fn raw_execute(&mut self) -> Result<usize> {
        match &mut self.0 {
            Stmt::Pg { pg, stmt, bound } => {
                let values: Vec<&dyn ToSql> = bound.iter().map(|v| v as &dyn ToSql).collect();
                pg.execute(stmt, &values)
            }
            _ => Ok(self.sqlite().expect("a SQLite statement").raw_execute()?),
        }
    }
}

/// The rows of a query.
pub struct Rows<'s>(RowsOf<'s>);

enum RowsOf<'s> {
    Sqlite(rusqlite::Rows<'s>),
    Pg {
        pg: &'s Pg,
        rows: std::pin::Pin<Box<tokio_postgres::RowStream>>,
        /// The row [`Rows::next`] handed out last.
        current: Option<tokio_postgres::Row>,
        /// Every row was read.
        done: bool,
    },
}

impl Drop for Rows<'_> {
    fn drop(&mut self) {
        if let RowsOf::Pg { pg, done, .. } = &self.0
            && !*done
        {
            // Rows left unread are thrown away by the session as they
            // arrive: it is free for the next statement.
            pg.reading.set(pg.reading.get() - 1);
        }
    }
}

impl Rows<'_> {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Row<'_>>> {
        match &mut self.0 {
            RowsOf::Sqlite(rows) => Ok(rows.next()?.map(|r| Row(RowOf::Sqlite(r)))),
            RowsOf::Pg {
                pg,
                rows,
                current,
                done,
            } => {
                let next = block_on(std::future::poll_fn(|cx| {
                    futures_core::Stream::poll_next(rows.as_mut(), cx)
                }));
                *current = match next {
                    None => {
                        // Every row is read: the session is free again.
                        if !*done {
                            *done = true;
                            pg.reading.set(pg.reading.get() - 1);
                        }
                        None
                    }
                    Some(Ok(row)) => Some(row),
                    Some(Err(e)) => {
                        pg.aborted.set(true);
                        return Err(e.into());
                    }
                };
                Ok(current.as_ref().map(|r| Row(RowOf::Pg(r))))
            }
        }
    }
}

/// The rows of [`Statement::query_map`], each through its function.
pub struct MappedRows<'s, F> {
    rows: Rows<'s>,
    f: F,
}

impl<T, F> Iterator for MappedRows<'_, F>
where
    F: FnMut(&Row<'_>) -> rusqlite::Result<T>,
{
    type Item = Result<T>;
    fn next(&mut self) -> Option<Result<T>> {
        match self.rows.next() {
            Ok(Some(r)) => Some((self.f)(&r).map_err(Error::from)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// One row of a query.
pub struct Row<'r>(RowOf<'r>);

enum RowOf<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Pg(&'r tokio_postgres::Row),
}

/// A column position (rusqlite also takes names; the store never does).
pub trait ColumnIndex {
    fn at(self) -> usize;
}

impl ColumnIndex for usize {
    fn at(self) -> usize {
        self
    }
}

impl Row<'_> {
    /// Column `i` as a `T`, in rusqlite's terms on both engines.
    pub fn get<I: ColumnIndex, T: FromSql>(&self, i: I) -> rusqlite::Result<T> {
        let i = i.at();
        match &self.0 {
            RowOf::Sqlite(r) => r.get(i),
            RowOf::Pg(_) => {
                let v = self.get_ref(i)?;
                T::column_result(v).map_err(|e| match e {
                    rusqlite::types::FromSqlError::InvalidType => {
                        rusqlite::Error::InvalidColumnType(i, self.name(i), v.data_type())
                    }
                    rusqlite::types::FromSqlError::OutOfRange(n) => {
                        rusqlite::Error::IntegralValueOutOfRange(i, n)
                    }
                    other => {
                        rusqlite::Error::FromSqlConversionFailure(i, v.data_type(), Box::new(other))
                    }
                })
            }
        }
    }

    fn name(&self, i: usize) -> String {
        match &self.0 {
            RowOf::Sqlite(r) => r
                .as_ref()
                .column_name(i)
                .map(str::to_string)
                .unwrap_or_default(),
            RowOf::Pg(r) => r
                .columns()
                .get(i)
                .map(|c| c.name().to_string())
                .unwrap_or_default(),
        }
    }

    /// Column `i` as it is stored. PostgreSQL's types map onto SQLite's
    /// five: integers and booleans are `Integer`, floats `Real`, text
    /// `Text`, bytea `Blob`.
    pub fn get_ref(&self, i: usize) -> rusqlite::Result<ValueRef<'_>> {
        match &self.0 {
            RowOf::Sqlite(r) => r.get_ref(i),
            RowOf::Pg(r) => pg_value(r, i),
        }
    }
}

fn pg_value(r: &tokio_postgres::Row, i: usize) -> rusqlite::Result<ValueRef<'_>> {
    let Some(col) = r.columns().get(i) else {
        return Err(rusqlite::Error::InvalidColumnIndex(i));
    };
    let ty = col.type_().clone();
    let bad = |e: tokio_postgres::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Null, Box::new(e))
    };
    let v = if ty == Type::INT8 {
        r.try_get::<_, Option<i64>>(i)
            .map_err(bad)?
            .map(ValueRef::Integer)
    } else if ty == Type::INT4 {
        r.try_get::<_, Option<i32>>(i)
            .map_err(bad)?
            .map(|v| ValueRef::Integer(v.into()))
    } else if ty == Type::INT2 {
        r.try_get::<_, Option<i16>>(i)
            .map_err(bad)?
            .map(|v| ValueRef::Integer(v.into()))
    } else if ty == Type::BOOL {
        r.try_get::<_, Option<bool>>(i)
            .map_err(bad)?
            .map(|v| ValueRef::Integer(v.into()))
    } else if ty == Type::FLOAT8 {
        r.try_get::<_, Option<f64>>(i)
            .map_err(bad)?
            .map(ValueRef::Real)
    } else if ty == Type::FLOAT4 {
        r.try_get::<_, Option<f32>>(i)
            .map_err(bad)?
            .map(|v| ValueRef::Real(v.into()))
    } else if ty == Type::BYTEA {
        r.try_get::<_, Option<&[u8]>>(i)
            .map_err(bad)?
            .map(ValueRef::Blob)
    } else if ty == Type::TEXT || ty == Type::VARCHAR || ty == Type::BPCHAR || ty == Type::NAME {
        r.try_get::<_, Option<&str>>(i)
            .map_err(bad)?
            .map(|s| ValueRef::Text(s.as_bytes()))
    } else {
        return Err(rusqlite::Error::InvalidColumnType(
            i,
            col.name().to_string(),
            rusqlite::types::Type::Null,
        ));
    };
    Ok(v.unwrap_or(ValueRef::Null))
}

/// A parameter as an owned value.
pub(crate) fn owned<T: ToSql + ?Sized>(v: &T) -> Result<Value> {
    use rusqlite::types::ToSqlOutput;
    Ok(match v.to_sql()? {
        ToSqlOutput::Borrowed(r) => r.into(),
        ToSqlOutput::Owned(v) => v,
        other => {
            return Err(Error::Sqlite(rusqlite::Error::ToSqlConversionFailure(
                format!("a parameter PostgreSQL cannot take: {other:?}").into(),
            )));
        }
    })
}

fn pg_params(values: &[&dyn ToSql]) -> Result<Vec<PgValue>> {
    values.iter().map(|v| owned(*v).map(PgValue)).collect()
}

/// A value sent to PostgreSQL as the type the server expects there.
#[derive(Debug)]
struct PgValue(Value);

impl PgToSql for PgValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        encode(&self.0, ty, out)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// [`PgValue`] borrowed: a row of a bulk copy, sent without a copy of its values.
#[derive(Debug)]
struct PgRef<'a>(&'a Value);

impl PgToSql for PgRef<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        encode(self.0, ty, out)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn encode(
    value: &Value,
    ty: &Type,
    out: &mut bytes::BytesMut,
) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
    {
        match value {
            Value::Null => Ok(IsNull::Yes),
            Value::Integer(i) if *ty == Type::INT8 => send(i, ty, out),
            Value::Integer(i) if *ty == Type::INT4 => send(i32::try_from(*i)?, ty, out),
            Value::Integer(i) if *ty == Type::INT2 => send(i16::try_from(*i)?, ty, out),
            Value::Integer(i) if *ty == Type::OID => send(u32::try_from(*i)?, ty, out),
            Value::Integer(i) if *ty == Type::BOOL => send(*i != 0, ty, out),
            Value::Integer(i) if *ty == Type::FLOAT8 => send(*i as f64, ty, out),
            Value::Integer(i) if is_text(ty) => send(i.to_string().as_str(), &Type::TEXT, out),
            Value::Real(f) if *ty == Type::FLOAT8 => send(f, ty, out),
            Value::Text(s) if is_text(ty) => send(s.as_str(), &Type::TEXT, out),
            Value::Text(s) if *ty == Type::BYTEA => send(s.as_bytes(), ty, out),
            Value::Blob(b) if *ty == Type::BYTEA => send(b.as_slice(), ty, out),
            v => Err(format!("a {:?} value cannot be sent as {ty}", v.data_type()).into()),
        }
    }
}

type Sent = std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>>;

fn send<T: PgToSql>(v: T, ty: &Type, out: &mut bytes::BytesMut) -> Sent {
    v.to_sql(ty, out)
}

fn is_text(ty: &Type) -> bool {
    [
        Type::TEXT,
        Type::VARCHAR,
        Type::BPCHAR,
        Type::NAME,
        Type::UNKNOWN,
    ]
    .contains(ty)
}

/// The store's SQL in PostgreSQL's terms: `?N` becomes `$N` (a bare `?`
/// the next number), and `INSERT OR ROLLBACK`/`OR ABORT` a plain `INSERT`
/// (PostgreSQL ends the statement on a conflict either way). Quoted text is
/// left alone.
pub(crate) fn to_postgres(sql: &str) -> String {
    let sql = sql
        .replace("INSERT OR ROLLBACK ", "INSERT ")
        .replace("INSERT OR ABORT ", "INSERT ");
    let mut out = String::with_capacity(sql.len() + 8);
    let mut next = 1u32;
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                out.push('$');
                if digits.is_empty() {
                    out.push_str(&next.to_string());
                    next += 1;
                } else {
                    out.push_str(&digits);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::to_postgres;

    #[test]
    fn placeholders_become_numbered_and_quoted_text_is_left_alone() {
        assert_eq!(
            to_postgres("SELECT a FROM t WHERE b = ?1 AND c = ?12 AND d = '?3'"),
            "SELECT a FROM t WHERE b = $1 AND c = $12 AND d = '?3'"
        );
        assert_eq!(
            to_postgres("VALUES (?, ?), (?, ?)"),
            "VALUES ($1, $2), ($3, $4)"
        );
        assert_eq!(
            to_postgres("INSERT OR ROLLBACK INTO t (a) VALUES (?1)"),
            "INSERT INTO t (a) VALUES ($1)"
        );
    }
}
