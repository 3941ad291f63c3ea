//! Writing checked records: one transaction ([`Store::import`]), rolled
//! back at the first bad record.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use super::Outcome;
use super::check::check_records;
use crate::config::Config;
use crate::model::{NewConnection, Timestamp};
use crate::store::{Store, StoreError};

/// Checks the records of `text` and writes them to `st` in one transaction
/// as they are checked; rolls back at the first bad one.
pub(super) fn write_checked(
    st: &mut Store,
    text: &str,
    config: &Config,
    now: Timestamp,
    existing: &HashSet<String>,
) -> Result<Outcome, StoreError> {
    // The store ends up about twice the size of the file; the page cache
    // holds up to 256 MiB of it, so little spills before the commit.
    st.prepare_bulk_write(text.len().saturating_mul(2).min(256 << 20))?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let rejected = AtomicBool::new(false);
    let (chunk_tx, chunk_rx) = mpsc::sync_channel::<Vec<NewConnection>>(4);
    std::thread::scope(|s| {
        let (rejected, bar) = (&rejected, &bar);
        let writer = s.spawn(move || write_chunks(st, chunk_rx, rejected, bar, now));
        let mut chunk_tx = Some(chunk_tx);
        let checked = check_records(text, config, now, existing, |good, problems| {
            if problems > 0 {
                // Nothing will be written: the writer rolls back now, and
                // the checking goes on to name every bad record. `rejected`
                // is set before the channel closes, so the writer, which
                // looks at it once the channel is closed, never commits.
                rejected.store(true, Ordering::SeqCst);
                drop(chunk_tx.take());
                return true;
            }
            let Some(to_writer) = &chunk_tx else {
                return true;
            };
            bar.inc_length(good.len() as u64);
            // A closed channel: the writer failed, and says why below.
            to_writer
                .send(good.into_iter().map(|(_, new)| new).collect())
                .is_ok()
        });
        if !matches!(&checked, Ok(p) if p.is_empty()) {
            rejected.store(true, Ordering::SeqCst);
        }
        // The writer commits when the chunks end, unless `rejected`.
        drop(chunk_tx);
        let written = writer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        bar.finish_and_clear();
        match (checked, written) {
            (Err(syntax), _) => Ok(Outcome::Unreadable(syntax)),
            (Ok(problems), Err(StoreError::Cancelled)) if !problems.is_empty() => {
                Ok(Outcome::Rejected(problems))
            }
            (Ok(_), Err(e)) => Err(e),
            (Ok(problems), Ok((total, pending))) => {
                assert!(problems.is_empty(), "a rejected import commits nothing");
                Ok(Outcome::Written { total, pending })
            }
        }
    })
}

/// The writing end of an import: writes the chunks as they come
/// ([`Store::import`]) and commits when they end, unless the import was
/// `rejected` (then it rolls back). Returns how many connections it wrote,
/// and how many of them wait for authorization.
fn write_chunks(
    st: &mut Store,
    chunks: mpsc::Receiver<Vec<NewConnection>>,
    rejected: &AtomicBool,
    bar: &indicatif::ProgressBar,
    now: Timestamp,
) -> Result<(usize, usize), StoreError> {
    // The write lock is taken only once there is something to write: a
    // running daemon's writes wait for it until the commit.
    let Ok(first) = chunks.recv() else {
        return if rejected.load(Ordering::SeqCst) {
            Err(StoreError::Cancelled)
        } else {
            Ok((0, 0))
        };
    };
    st.import(
        std::iter::once(first).chain(chunks),
        rejected,
        |n| bar.inc(n as u64),
        now,
    )
}
