//! The store as async code holds it: one writer that commits together the
//! writes waiting at that moment (group commit), and read connections.
//!
//! A durable commit costs a WAL fsync whatever it holds, so under load the
//! fsyncs were the queue: every claim and every save of every concurrent
//! refresh was its own commit, one after another. The writer thread takes
//! the first write waiting, then every other one queued behind it (up to
//! [`BATCH_MAX`]), runs each in its own savepoint of one immediate
//! transaction, commits once, and only then answers each caller. So:
//!
//! - a caller's write is durable before it hears `Ok` (invariants 1 and 2:
//!   a claim is committed before its request is sent, a rotated token before
//!   its access token is used), exactly as with a commit of its own;
//! - a write whose closure fails is rolled back to its savepoint and hears
//!   its own error; the others in the batch go on;
//! - a commit that fails fails every write of the batch with that error, as
//!   a failed commit of each alone would have;
//! - a lone write waits for nobody: a batch is whatever is queued when the
//!   writer is free, never a timer.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};

use crate::store::sql::{Transaction, TransactionBehavior};
use tokio::sync::oneshot;

use super::{Create, SharedKeyring, Store, StoreError};
use crate::config::StoreTarget;
use crate::crypto::Keyring;

/// The most writes committed together. Bounds how long the first of them
/// waits for the others to run (each is a few statements).
pub const BATCH_MAX: usize = 256;

/// How many read connections a handle keeps: reads of one task never wait
/// behind a long read of another (a status listing, the planning pass).
const READERS: usize = 2;

/// Counts kept by the writer, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed (each one durable commit).
    pub commits: AtomicU64,
    /// Writes answered, in committed batches or alone.
    pub writes: AtomicU64,
    /// Jobs handed to the writer (writes and exclusive uses).
    pub queued: AtomicU64,
}

/// The store shared by a daemon's tasks. Cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` once the handle is being dropped.
    queue: Mutex<Option<Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Vec<Mutex<Store>>,
    next_reader: AtomicUsize,
    path: PathBuf,
    keyring: SharedKeyring,
    stats: Arc<WriterStats>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreHandle({})", self.inner.path.display())
    }
}

/// What the writer thread is asked to do.
enum Job {
    /// A write closure, run in the next batch.
    Write(Box<dyn Work>),
    /// Exclusive use of the writer's connection between batches.
    Exclusive(Box<dyn FnOnce(&mut Store) + Send>),
}

/// A write with its result slot: run inside the batch, answered after the commit.
trait Work: Send {
    /// Runs the write; `false` when it failed (its savepoint is rolled back).
    fn run(&mut self, tx: &Transaction<'_>, keyring: &Keyring) -> bool;
    /// Sends the outcome: its own, or the batch's when the commit failed.
    fn answer(self: Box<Self>, batch: Result<(), &StoreError>);
}

type Panic = Box<dyn Any + Send>;
type Reply<T> = oneshot::Sender<Result<Result<T, StoreError>, Panic>>;

struct Write<T, F> {
    f: Option<F>,
    out: Option<Result<Result<T, StoreError>, Panic>>,
    reply: Reply<T>,
}

impl<T, F> Work for Write<T, F>
where
    T: Send,
    F: FnOnce(&Transaction<'_>, &Keyring) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, tx: &Transaction<'_>, keyring: &Keyring) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let out = catch_unwind(AssertUnwindSafe(|| f(tx, keyring)));
        let ok = matches!(out, Ok(Ok(_)));
        self.out = Some(out);
        ok
    }

    fn answer(self: Box<Self>, batch: Result<(), &StoreError>) {
        let out = match (self.out, batch) {
            // Its own failure (or panic) stands, whatever the batch did.
            (Some(Ok(Err(e))), _) => Ok(Err(e)),
            (Some(Err(panic)), _) => Err(panic),
            (Some(Ok(Ok(v))), Ok(())) => Ok(Ok(v)),
            (Some(Ok(Ok(_))) | None, Err(e)) => Ok(Err(e.for_each_caller())),
            (None, Ok(())) => Ok(Err(StoreError::Unwritable(
                "the write was never run".into(),
            ))),
        };
        // The caller may have gone (its task was cancelled): nothing to tell.
        let _ = self.reply.send(out);
    }
}

impl StoreError {
    /// The same failure for another caller of a batch that failed as a whole.
    pub(crate) fn for_each_caller(&self) -> StoreError {
        match self {
            StoreError::Busy => StoreError::Busy,
            StoreError::Unwritable(m) => StoreError::Unwritable(m.clone()),
            StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
            StoreError::Sql(rusqlite::Error::SqliteFailure(code, msg)) => {
                StoreError::Sql(rusqlite::Error::SqliteFailure(*code, msg.clone()))
            }
            // Anything else ended the batch's transaction: its writes are lost,
            // as when a commit of their own fails.
            other => StoreError::Unwritable(other.to_string()),
        }
    }
}

impl StoreHandle {
    /// Opens the store at `path` for a daemon: the writer's connection and
    /// the read connections, all on `keyring`.
    pub fn open(target: &StoreTarget, keyring: &SharedKeyring) -> Result<StoreHandle, StoreError> {
        let writer = Store::open_target(target, keyring, Create::No)?;
        StoreHandle::from_store(writer)
    }

    /// A handle whose writer is `writer` (already open and migrated).
    pub fn from_store(writer: Store) -> Result<StoreHandle, StoreError> {
        let path = writer.path().to_path_buf();
        let target = writer.target().clone();
        let keyring = writer.shared_keyring().clone();
        let readers = (0..READERS)
            .map(|_| Store::open_target(&target, &keyring, Create::No).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let (queue, jobs) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(writer, jobs, &thread_stats))
            .map_err(|error| StoreError::Io {
                what: "cannot start the store writer for",
                path: path.clone(),
                error,
            })?;
        Ok(StoreHandle {
            inner: Arc::new(Inner {
                queue: Mutex::new(Some(queue)),
                writer: Mutex::new(Some(thread)),
                readers,
                next_reader: AtomicUsize::new(0),
                path,
                keyring,
                stats,
            }),
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The keyring that seals and opens the store's values now.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.inner.keyring.current()
    }

    /// The shared keyring cell, to open more connections on it.
    pub fn shared_keyring(&self) -> &SharedKeyring {
        &self.inner.keyring
    }

    /// The writer's counts.
    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.inner.stats
    }

    fn send(&self, job: Job) -> bool {
        let queue = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
        let sent = queue.as_ref().is_some_and(|q| q.send(job).is_ok());
        if sent {
            self.inner.stats.queued.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Runs `f` in the next batch; returns once the batch is durable (or
    /// `f`'s own error, with nothing of it written). A panic in `f` is
    /// rolled back and resumed here.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>, &Keyring) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job::Write(Box::new(Write {
            f: Some(f),
            out: None,
            reply,
        }));
        if !self.send(job) {
            return Err(stopped());
        }
        match answer.await {
            Ok(Ok(out)) => out,
            Ok(Err(panic)) => resume_unwind(panic),
            Err(_) => Err(stopped()),
        }
    }

    /// Runs `f` with the writer's connection to itself, between batches: for
    /// what needs the whole connection (a key switch, a backup, pruning, a
    /// stepwise re-seal that makes its own transactions).
    pub async fn exclusive<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> T + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, Panic>>();
        let job = Job::Exclusive(Box::new(move |st: &mut Store| {
            let out = catch_unwind(AssertUnwindSafe(|| f(st)));
            let _ = reply.send(out);
        }));
        if !self.send(job) {
            panic!("the store writer thread is gone");
        }
        match answer.await {
            Ok(Ok(v)) => v,
            Ok(Err(panic)) => resume_unwind(panic),
            // The writer thread only ends when every handle is gone.
            Err(_) => panic!("the store writer thread is gone"),
        }
    }

    /// Runs `f` on a read connection, off the async threads. Sees every
    /// write committed before it starts.
    pub async fn read<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> T + Send + 'static,
    {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || inner.with_reader(f)).await {
            Ok(v) => v,
            Err(e) => resume_unwind(e.into_panic()),
        }
    }

    /// A read of a few rows by key (a connection by id or name, one secret),
    /// run right here when a read connection is free: such a read takes
    /// microseconds in WAL mode (readers never wait for the writer), far less
    /// than handing it to a blocking thread and back. When every reader is
    /// busy (a long listing), it goes to a blocking thread like
    /// [`StoreHandle::read`]. Never use it for a scan.
    pub async fn read_row<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> T + Send + 'static,
    {
        for r in &self.inner.readers {
            if let Ok(guard) = r.try_lock() {
                return f(&guard);
            }
        }
        self.read(f).await
    }

    /// [`StoreHandle::read`] from a blocking context (a start-up pass).
    pub fn read_blocking<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        self.inner.with_reader(f)
    }
}

impl Drop for Inner {
    /// The last handle gone: the writer finishes, closes its connection (so
    /// SQLite checkpoints and removes the WAL when it is the last one, as
    /// when a `Store` is dropped) and is joined before this returns.
    fn drop(&mut self) {
        drop(
            self.queue
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = writer
            && w.thread().id() != std::thread::current().id()
        {
            let _ = w.join();
        }
    }
}

impl Inner {
    fn with_reader<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        // A free reader if there is one, else the next in turn.
        for r in &self.readers {
            if let Ok(guard) = r.try_lock() {
                return f(&guard);
            }
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let guard = self.readers[i].lock().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }
}

fn stopped() -> StoreError {
    StoreError::Unwritable("the store writer has stopped".into())
}

/// The writer thread: batches until every handle is dropped.
fn writer_loop(mut store: Store, jobs: Receiver<Job>, stats: &WriterStats) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut batch = match first {
            Job::Exclusive(f) => {
                f(&mut store);
                continue;
            }
            Job::Write(w) => vec![w],
        };
        while batch.len() < BATCH_MAX {
            match jobs.try_recv() {
                Ok(Job::Write(w)) => batch.push(w),
                // Runs after this batch, in the order it was asked.
                Ok(exclusive) => {
                    carried = Some(exclusive);
                    break;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        commit_batch(&mut store, batch, stats);
    }
}

/// Runs `batch` in one transaction, each write in its own savepoint (a lone
/// write needs none: its failure rolls back the transaction), commits, answers.
fn commit_batch(store: &mut Store, mut batch: Vec<Box<dyn Work>>, stats: &WriterStats) {
    let n = batch.len() as u64;
    let keyring = store.keyring();
    let db = store.db_mut();
    let tx = match db.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let e = StoreError::from(e);
            for w in batch {
                w.answer(Err(&e));
            }
            return;
        }
    };
    let alone = batch.len() == 1;
    let mut failure: Option<StoreError> = None;
    let mut lone_failed = false;
    let mut ran = 0;
    for w in batch.iter_mut() {
        if alone {
            lone_failed = !w.run(&tx, &keyring);
            ran += 1;
            continue;
        }
        // Cached statements: parsing these three on every write cost more
        // than running them.
        let step = |sql: &str| tx.prepare_cached(sql).and_then(|mut st| st.execute(()));
        if let Err(e) = step("SAVEPOINT w") {
            failure = Some(e.into());
            break;
        }
        let ok = w.run(&tx, &keyring);
        ran += 1;
        let end = if ok {
            step("RELEASE w")
        } else {
            step("ROLLBACK TO w").and_then(|_| step("RELEASE w"))
        };
        // An I/O error or a full disk can end the whole transaction under a
        // write: the savepoint is gone, and with it the writes before.
        if let Err(e) = end {
            failure = Some(e.into());
            break;
        }
        if tx.is_autocommit() {
            failure = Some(StoreError::Unwritable(
                "the transaction was rolled back by SQLite".into(),
            ));
            break;
        }
    }
    let outcome = match failure {
        Some(e) => Err(e),
        None if lone_failed => {
            // Its own failure: nothing of it is kept.
            drop(tx);
            Ok(())
        }
        None => {
            let committed = tx.commit().map_err(StoreError::from);
            if committed.is_ok() {
                stats.commits.fetch_add(1, Ordering::Relaxed);
            }
            committed
        }
    };
    stats.writes.fetch_add(n, Ordering::Relaxed);
    let mut rest = batch.split_off(ran);
    for w in batch {
        w.answer(outcome.as_ref().map(|_| ()));
    }
    // Never run (the batch ended early): failed with it.
    let e = match &outcome {
        Err(e) => e.for_each_caller(),
        Ok(()) => StoreError::Unwritable("the batch ended early".into()),
    };
    for w in rest.drain(..) {
        w.answer(Err(&e));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::crypto::{Key, Keyring};

    fn handle() -> (tempfile::TempDir, StoreHandle) {
        let dir = tempfile::tempdir().unwrap();
        let st = crate::store::testing::open(
            &crate::store::testing::target(dir.path()),
            Keyring::new(Key::generate(), vec![]),
            Create::Yes,
        )
        .unwrap();
        (dir, StoreHandle::from_store(st).unwrap())
    }

    fn put(tx: &Transaction<'_>, key: &str) -> Result<(), StoreError> {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, 1)",
            [format!("test-{key}")],
        )?;
        Ok(())
    }

    async fn present(h: &StoreHandle, key: &str) -> bool {
        let key = format!("test-{key}");
        h.read(move |st| {
            st.db()
                .query_row("SELECT count(*) FROM meta WHERE key = ?1", [key], |r| {
                    r.get::<_, i64>(0)
                })
                .unwrap()
                == 1
        })
        .await
    }

    /// Holds the writer (an exclusive job) until the returned sender is sent
    /// to or dropped: writes queued meanwhile wait together.
    async fn hold_writer(h: &StoreHandle) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let h2 = h.clone();
        tokio::spawn(async move {
            h2.exclusive(move |_| {
                let _ = held.recv();
            })
            .await
        });
        release
    }

    async fn wait_queued(h: &StoreHandle, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while h.stats().queued.load(Ordering::Relaxed) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} jobs reached the writer",
                h.stats().queued.load(Ordering::Relaxed)
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_waiting_together_are_one_commit() {
        let (_dir, h) = handle();
        let release = hold_writer(&h).await;
        let before = h.stats().commits.load(Ordering::Relaxed);
        let writes: Vec<_> = (0..50)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move { h.write(move |tx, _| put(tx, &i.to_string())).await })
            })
            .collect();
        wait_queued(&h, 51).await;
        release.send(()).unwrap();
        for w in writes {
            w.await.unwrap().unwrap();
        }
        assert_eq!(h.stats().commits.load(Ordering::Relaxed) - before, 1);
        for i in 0..50 {
            assert!(present(&h, &i.to_string()).await, "write {i} is durable");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_is_rolled_back_alone_and_hears_its_own_error() {
        let (_dir, h) = handle();
        let release = hold_writer(&h).await;
        let spawn = |key: &'static str, fail: bool| {
            let h = h.clone();
            tokio::spawn(async move {
                h.write(move |tx, _| {
                    put(tx, key)?;
                    if fail {
                        return Err(StoreError::Cancelled);
                    }
                    Ok(())
                })
                .await
            })
        };
        let (a, b, c) = (spawn("a", false), spawn("b", true), spawn("c", false));
        wait_queued(&h, 4).await;
        release.send(()).unwrap();
        a.await.unwrap().unwrap();
        assert!(matches!(b.await.unwrap(), Err(StoreError::Cancelled)));
        c.await.unwrap().unwrap();
        assert!(present(&h, "a").await);
        assert!(!present(&h, "b").await, "the failed write left nothing");
        assert!(present(&h, "c").await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_write_is_rolled_back_and_its_caller_panics() {
        let (_dir, h) = handle();
        let release = hold_writer(&h).await;
        let h1 = h.clone();
        let bad = tokio::spawn(async move {
            h1.write(|tx, _| -> Result<(), StoreError> {
                put(tx, "bad")?;
                panic!("a bug in a write");
            })
            .await
        });
        let h2 = h.clone();
        let good = tokio::spawn(async move { h2.write(|tx, _| put(tx, "good")).await });
        wait_queued(&h, 3).await;
        release.send(()).unwrap();
        assert!(bad.await.unwrap_err().is_panic());
        good.await.unwrap().unwrap();
        assert!(!present(&h, "bad").await);
        assert!(present(&h, "good").await);
        // The writer goes on.
        h.write(|tx, _| put(tx, "after")).await.unwrap();
        assert!(present(&h, "after").await);
    }

    #[tokio::test]
    async fn dropping_the_last_handle_closes_the_store_like_a_store() {
        if crate::store::testing::on_postgres() {
            return dropping_the_last_handle_closes_its_postgres_connections().await;
        }
        let (dir, h) = handle();
        h.write(|tx, _| put(tx, "x")).await.unwrap();
        let h2 = h.clone();
        drop(h);
        assert!(
            dir.path().join("acutoken.db-wal").exists(),
            "a clone still holds it"
        );
        drop(h2);
        // Every connection closed: SQLite checkpointed and removed the WAL.
        assert!(!dir.path().join("acutoken.db-wal").exists());
    }

    /// On PostgreSQL the writer and readers are sessions of the server:
    /// dropping the last handle ends every one of them.
    async fn dropping_the_last_handle_closes_its_postgres_connections() {
        let (_dir, h) = handle();
        h.write(|tx, _| put(tx, "x")).await.unwrap();
        let target = h.read_blocking(|st| st.target().clone());
        let watcher = Store::open_target(&target, h.shared_keyring(), Create::No).unwrap();
        let sessions = |st: &Store| -> i64 {
            st.db()
                .query_row(
                    "SELECT COUNT(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    (),
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(
            sessions(&watcher),
            1 + READERS as i64,
            "the writer and the readers"
        );
        let h2 = h.clone();
        drop(h);
        assert_eq!(
            sessions(&watcher),
            1 + READERS as i64,
            "a clone still holds them"
        );
        drop(h2);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while sessions(&watcher) > 0 {
            assert!(std::time::Instant::now() < deadline, "sessions left open");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn a_row_read_sees_every_write_answered_before_it() {
        let (_dir, h) = handle();
        for i in 0..20 {
            h.write(move |tx, _| put(tx, &i.to_string())).await.unwrap();
            let key = format!("test-{i}");
            let seen = h
                .read_row(move |st| {
                    st.db()
                        .query_row("SELECT count(*) FROM meta WHERE key = ?1", [key], |r| {
                            r.get::<_, i64>(0)
                        })
                        .unwrap()
                })
                .await;
            assert_eq!(seen, 1, "write {i} is visible to the next read");
        }
    }

    #[tokio::test]
    async fn a_lone_write_commits_alone_and_a_lone_failure_commits_nothing() {
        let (_dir, h) = handle();
        let commits = || h.stats().commits.load(Ordering::Relaxed);
        let before = commits();
        h.write(|tx, _| put(tx, "one")).await.unwrap();
        assert_eq!(commits() - before, 1);
        let err = h
            .write(|tx, _| {
                put(tx, "two")?;
                Err::<(), _>(StoreError::Cancelled)
            })
            .await;
        assert!(matches!(err, Err(StoreError::Cancelled)));
        assert_eq!(commits() - before, 1, "nothing committed for a failure");
        assert!(!present(&h, "two").await);
    }
}
