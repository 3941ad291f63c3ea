//! `acutoken store copy --to PATH_OR_URL`: the configured store into a new
//! one, SQLite to PostgreSQL or back (DESIGN §10).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::Ctx;
use crate::config::StoreTarget;
use crate::daemon::lock::StoreLock;
use crate::store::{self, Create, SharedKeyring, Store, copy};

pub fn run(ctx: &Ctx, to: &str, password_file: Option<&Path>) -> anyhow::Result<i32> {
    let from_target = ctx.config.store_target()?;
    let to_target = destination(ctx, to, password_file)?;
    if same_place(&from_target, &to_target) {
        anyhow::bail!("--to names the store being copied: give another file or database");
    }
    if let StoreTarget::File(path) = &from_target
        && !path.exists()
    {
        return Err(store::StoreError::Missing { path: path.clone() }.into());
    }
    // The source's daemon lock, held to the end: a copy of a store a daemon
    // is writing would miss what it writes after the copy's snapshot, and a
    // rotated token saved only in the old store is lost when the new one
    // takes over.
    let _from_lock = StoreLock::acquire_target(&from_target).map_err(|e| {
        anyhow::anyhow!("{e}; stop the daemon before copying its store (README: Moving a store)")
    })?;
    let keys = store::resolve_keyring_for(&ctx.config, &from_target, false)?;
    let keyring = SharedKeyring::new(keys.keyring);
    let from = Store::open_target(&from_target, &keyring, Create::No)?;

    let made = match &to_target {
        StoreTarget::File(path) if path.exists() => anyhow::bail!(
            "{} exists: store copy writes a new file only (remove it, or name another)",
            path.display()
        ),
        StoreTarget::File(path) => Some(path.clone()),
        StoreTarget::Postgres(_) => None,
    };
    let result = copy_to(&from, &to_target, &keyring);
    if result.is_err()
        && let Some(path) = &made
    {
        // All or nothing: a file this run made goes with its failure.
        for suffix in ["", "-wal", "-shm", "-journal", ".lock"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }
    let (rows, connections, to_name) = result?;
    println!(
        "copied {connections} connection(s) and {rows} row(s) in all from {} to {to_name}",
        from.path().display()
    );
    println!(
        "next: point the config at the copy ({}) and start the daemon; the same key opens it",
        match &to_target {
            StoreTarget::File(_) => "store.path, and remove store.url",
            StoreTarget::Postgres(_) => "store.url and store.password_file, and remove store.path",
        }
    );
    Ok(0)
}

/// Copies `from` into the new or empty store `to` in one transaction.
fn copy_to(
    from: &Store,
    to: &StoreTarget,
    keyring: &SharedKeyring,
) -> anyhow::Result<(u64, usize, String)> {
    if let StoreTarget::File(path) = to
        && let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _to_lock = StoreLock::acquire_target(to)?;
    let mut dest = Store::open_target(to, keyring, Create::Yes)?;
    if !copy::is_empty(&dest)? {
        anyhow::bail!(
            "{} already holds a store (connections, history, alerts or another key): copy only into an empty database",
            dest.path().display()
        );
    }
    let total = copy::rows(from)?;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let rows = dest
        .copy_from(from, |n| bar.set_position(n))
        .with_context(|| format!("copying into {}", dest.path().display()))?;
    bar.finish_and_clear();
    let connections = dest.names()?.len();
    Ok((rows, connections, dest.path().display().to_string()))
}

/// What `--to` names: a PostgreSQL URL (checked as `store.url` is, its
/// password from `--to-password-file` or the credential) or a file.
fn destination(ctx: &Ctx, to: &str, password_file: Option<&Path>) -> anyhow::Result<StoreTarget> {
    if to.starts_with("postgres://") || to.starts_with("postgresql://") {
        let mut c = ctx.config.clone();
        c.store.url = Some(to.to_string());
        c.store.path = None;
        c.store.password_file = password_file.map(Path::to_path_buf);
        return c.store_target().context("--to");
    }
    if password_file.is_some() {
        anyhow::bail!("--to-password-file goes with a PostgreSQL --to (postgres://...)");
    }
    Ok(StoreTarget::File(PathBuf::from(to)))
}

fn same_place(a: &StoreTarget, b: &StoreTarget) -> bool {
    match (a, b) {
        (StoreTarget::File(x), StoreTarget::File(y)) => {
            x == y || std::fs::canonicalize(x).ok() == std::fs::canonicalize(y).ok() && x.exists()
        }
        (StoreTarget::Postgres(x), StoreTarget::Postgres(y)) => x.url == y.url,
        _ => false,
    }
}
