//! `acutoken connection import FILE`: many connections from one JSON file,
//! all or nothing.
//!
//! The records are checked on every core and written as they are checked,
//! in file order: chunks go from the checking threads, through one that
//! puts them back in order, names duplicates and hands out ids, to a thread
//! that seals their secrets, and on to the one that writes them in a single
//! transaction. The first bad record stops the writing and rolls it back;
//! the checking goes on so that one run names every record to fix.
//!
//! Into a store that does not exist yet, the store is built apart and moved
//! into place whole ([`Store::build`]): a bad file leaves no store, key or
//! directory behind, and the build skips the WAL's second copy of every page.
//!
//! [`check`] reads and checks the records, [`write`] writes them in one
//! transaction, [`signals`] removes a half-built store on SIGINT/SIGTERM.

mod check;
mod signals;
mod write;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context as _;

use super::Ctx;
use crate::model::Timestamp;
use crate::store::{self, Create, Store};
pub use check::{ImportSyntax, ParsedImport, parse_import};
use signals::{CleanUpOnSignal, Interrupts};
use write::write_checked;

/// What an import wrote, or why it wrote nothing.
enum Outcome {
    /// Every record is in: how many, and how many wait for authorization.
    Written { total: usize, pending: usize },
    /// Bad records, in file order: nothing was written.
    Rejected(Vec<(usize, String)>),
    /// Not a JSON array of objects: nothing was written.
    Unreadable(ImportSyntax),
}

pub(super) fn import(ctx: &Ctx, file: &Path, now: Timestamp) -> anyhow::Result<i32> {
    let meta =
        std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "warning: {} holds secrets and is readable by group or others: `chmod 600` it, or delete it after the import",
            file.display()
        );
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let path = ctx.config.store_path();
    // A PostgreSQL store is written in place, in one transaction, whether
    // its database is new or not; a SQLite store that does not exist yet is
    // built apart and published whole.
    let on_postgres = matches!(
        ctx.config.store_target()?,
        crate::config::StoreTarget::Postgres(_)
    );
    let (outcome, new_key) = if on_postgres || path.exists() {
        // Names already in the store are named with the other problems, so
        // one run lists every record to fix.
        let mut st = ctx.open_store(if on_postgres { Create::Yes } else { Create::No })?;
        let existing: HashSet<String> = st.names()?.into_iter().collect();
        (
            write_checked(&mut st, &text, &ctx.config, now, &existing)?,
            None,
        )
    } else {
        let (found, new_key) = store::resolve_keyring_deferred(&ctx.config, &path)?;
        let keyring = match (found, &new_key) {
            (Some(res), _) => res.keyring,
            (None, Some(k)) => k.keyring(),
            (None, None) => unreachable!("a key is found or made"),
        };
        let interrupts = Interrupts::catch();
        let mut fresh = Store::build(&path, keyring)?;
        let _cleanup = CleanUpOnSignal::install(interrupts, fresh.leftovers());
        let outcome = write_checked(fresh.store(), &text, &ctx.config, now, &HashSet::new())?;
        if let Outcome::Written { .. } = outcome {
            fresh.publish(|| new_key.as_ref().map_or(Ok(()), |k| k.write().map(drop)))?;
        }
        (outcome, new_key)
    };
    match outcome {
        Outcome::Written { total, pending } => {
            if let Some(k) = new_key {
                let key = k.path().display();
                eprintln!(
                    "created a new store key at {key} (mode 0600): back it up, the store cannot be read without it; under systemd, load it with LoadCredential=acutoken.key:{key} instead"
                );
            }
            println!(
                "imported {total} connections from {} ({pending} waiting for authorization)",
                file.display(),
            );
            Ok(0)
        }
        Outcome::Rejected(problems) => {
            for (_, p) in &problems {
                eprintln!("  {p}");
            }
            anyhow::bail!(
                "{} of the records in {} are invalid (listed above): nothing imported",
                problems.len(),
                file.display()
            )
        }
        Outcome::Unreadable(e) => anyhow::bail!("{} is {e}: nothing imported", file.display()),
    }
}
