//! `key generate`, `key rotate`, and the packaging assets.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::Context as _;

use super::Ctx;
use crate::crypto::{self, Key, KeySource, Keyring};
use crate::daemon::rotate;
use crate::store::Create;

/// `key generate [--out FILE]`.
pub fn generate(out: Option<&Path>) -> anyhow::Result<i32> {
    let key = Key::generate();
    match out {
        Some(p) => {
            crypto::write_key_file(p, &key)
                .with_context(|| format!("cannot write the key to {}", p.display()))?;
            eprintln!(
                "wrote a new key to {} (mode 0600, key id {})",
                p.display(),
                key.id()
            );
        }
        None if std::io::stdout().is_terminal() => {
            anyhow::bail!(
                "refusing to print a key to a terminal: use --out FILE, or redirect stdout to a file"
            )
        }
        None => {
            let mut o = std::io::stdout().lock();
            writeln!(o, "{}", key.to_base64().expose())
                .context("cannot write the key to stdout")?;
        }
    }
    Ok(0)
}

/// `key rotate --new-key-file FILE`: re-seal everything in short batches.
/// Through the daemon when it runs (it holds the store lock), on the store
/// directly, holding that lock, when it does not.
pub async fn rotate(ctx: &Ctx, new_key_file: &Path) -> anyhow::Result<i32> {
    let new = Key::from_file(new_key_file, KeySource::File(new_key_file.to_path_buf()))?;
    let target = ctx.config.store_target()?;
    if let crate::config::StoreTarget::File(path) = &target
        && !path.exists()
    {
        return Err(crate::store::StoreError::Missing { path: path.clone() }.into());
    }
    // The daemon's own lock, held to the end: a daemon started meanwhile is
    // refused (naming this process) instead of sealing under the retired key.
    match crate::daemon::lock::StoreLock::acquire_target(&target) {
        Ok(lock) => rotate_offline(ctx, new_key_file, new, lock),
        Err(e) => {
            let held = matches!(
                e.downcast_ref::<crate::daemon::lock::LockError>(),
                Some(crate::daemon::lock::LockError::Held { .. })
            ) || matches!(
                e.downcast_ref::<crate::store::StoreError>(),
                Some(crate::store::StoreError::Served { .. })
            );
            if !held {
                return Err(e);
            }
            if !ctx.config.socket_path().exists() {
                // PostgreSQL: the daemon serving the store runs elsewhere.
                anyhow::bail!(
                    "{e}; its socket {} is not on this machine: run `acutoken key rotate` where that daemon runs",
                    ctx.config.socket_path().display()
                );
            }
            rotate_through_daemon(ctx, new_key_file, new).await
        }
    }
}

fn rotate_offline(
    ctx: &Ctx,
    new_key_file: &Path,
    new: Key,
    _lock: crate::daemon::lock::StoreLock,
) -> anyhow::Result<i32> {
    let mut st = ctx.open_store(Create::No)?;
    let old = st.keyring();
    if old.primary().id() == new.id() {
        anyhow::bail!(
            "{} is already the store's primary key",
            new_key_file.display()
        );
    }
    // A refresh in flight (a CLI's: the daemon is stopped) seals its rotated
    // token under the key it started with: wait for it, before and after.
    let patience = ctx.config.renewal.http_timeout + std::time::Duration::from_secs(5);
    wait_for_refreshes(&st, patience)?;
    st.register_key(&new)?;
    let mut previous = vec![old.primary().clone()];
    previous.extend(old.previous().iter().cloned());
    st.set_keyring(Keyring::new(new.clone(), previous));
    let total = rotate::old_values(&st, new.id())?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Short steps keep each write transaction well under a second.
    let done = st.reseal_all(500, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    // A refresh that claimed before the new key was in place and saved since
    // sealed under the old one: wait for any still in flight, then count.
    wait_for_refreshes(&st, patience)?;
    let done = done + st.reseal_all(500, |_| {})?;
    let left = rotate::old_values(&st, new.id())?;
    if left != 0 {
        anyhow::bail!("{left} values are still sealed under an old key; run the rotation again");
    }
    let spills = rotate::reseal_spills(
        &ctx.config,
        &st.keyring(),
        &Keyring::new(new.clone(), Vec::new()),
    );
    // From now on only the new key opens the store: a command still using the
    // old one is refused instead of sealing values the new key cannot open.
    st.retire_keys_except(&new)?;
    report(done, new.id(), spills.resealed, &spills.failed);
    println!(
        "next: make {} the key acutoken finds (store.key_file, the systemd credential, ACUTOKEN_KEY, or acutoken.key beside the store); the old key no longer opens the store: keep it only to read backups made before now",
        new_key_file.display()
    );
    Ok(0)
}

/// The lines both rotations print.
fn report(done: u64, key_id: &str, spills: usize, failed: &[(std::path::PathBuf, String)]) {
    println!(
        "re-sealed {done} values under key {key_id}; nothing sealed under an old key remains."
    );
    if spills > 0 {
        println!("re-sealed {spills} spilled token(s) waiting to be imported");
    }
    for (path, why) in failed {
        eprintln!(
            "warning: the spill file {} was not re-sealed: it {why}; it will not open under the new key",
            path.display()
        );
    }
}

/// The daemon runs: it holds the store and its keyring, so it rotates. The
/// key is read here (the daemon's sandbox may not see FILE) and sent over the
/// local socket only.
async fn rotate_through_daemon(ctx: &Ctx, new_key_file: &Path, new: Key) -> anyhow::Result<i32> {
    use crate::daemon::client::call_with_body;
    let socket = ctx.config.socket_path();
    // The daemon replaces its key only for someone who holds it.
    let current =
        crate::store::resolve_keyring_for(&ctx.config, &ctx.config.store_target()?, false)?;
    let body = {
        let req = rotate::RotateRequest {
            key: new.to_base64().expose().to_string(),
            source: new_key_file.display().to_string(),
            current: current.keyring.primary().to_base64().expose().to_string(),
        };
        zeroize::Zeroizing::new(serde_json::to_vec(&req).context("cannot encode the request")?)
    };
    let timeout = std::time::Duration::from_secs(60);
    // A daemon that is starting holds the lock before its socket is bound:
    // nothing was sent while the connection is refused, so asking again is safe.
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let a = loop {
        match call_with_body(&socket, "POST", "/v1/keys/rotate", Some(&body), timeout).await {
            Err(crate::daemon::client::ClientError::Connect { .. })
                if crate::daemon::running(&ctx.config) && std::time::Instant::now() < give_up =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => break other.with_context(|| {
                format!(
                    "a daemon holds the store lock but its socket {} does not answer: key rotation goes through it while it runs",
                    socket.display()
                )
            })?,
        }
    };
    drop(body);
    let first: rotate::Progress = match a.status {
        202 | 200 => serde_json::from_slice(&a.body)
            .context("the daemon's answer is not the JSON this version expects")?,
        _ => anyhow::bail!(
            "the daemon refused the rotation: {}",
            api_error(&a.body, a.status)
        ),
    };
    eprintln!(
        "the daemon switched to key {} and is re-sealing; refreshes and token requests go on",
        first.key_id
    );
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    // A rotation of a million connections takes minutes: ask how it stands
    // until it ends, for as long as the daemon answers.
    let p = loop {
        let a = call_with_body(&socket, "GET", "/v1/keys/rotate", None, timeout)
            .await
            .context("the daemon stopped answering during the rotation: once it runs again, run `acutoken key rotate` again with the same key file; it resumes")?;
        if a.status != 200 {
            anyhow::bail!(
                "cannot follow the rotation: {}",
                api_error(&a.body, a.status)
            );
        }
        let p: rotate::Progress = serde_json::from_slice(&a.body)
            .context("the daemon's answer is not the JSON this version expects")?;
        bar.set_length(p.total.max(p.resealed));
        bar.set_position(p.resealed);
        bar.set_message(p.phase.clone());
        if !p.running() {
            break p;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    if let Some(e) = &p.error {
        anyhow::bail!("the key rotation stopped: {e}");
    }
    report(p.resealed, &p.key_id, p.spills_resealed, &p.spills_failed);
    println!(
        "next: make {} the key acutoken finds (the systemd credential, store.key_file, ACUTOKEN_KEY, or acutoken.key beside the store) before the daemon next starts: it runs on the new key now, and the old key no longer opens the store (keep it only to read backups made before now)",
        new_key_file.display()
    );
    Ok(0)
}

fn api_error(body: &[u8], status: u16) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("the daemon answered HTTP {status}"))
}

/// Waits until no connection has a live claim (bounded), or refuses.
fn wait_for_refreshes(
    st: &crate::store::Store,
    patience: std::time::Duration,
) -> anyhow::Result<()> {
    let give_up = std::time::Instant::now() + patience;
    let mut told = false;
    loop {
        let Some((name, holder)) = rotate::foreign_claim(st, None)? else {
            return Ok(());
        };
        if std::time::Instant::now() >= give_up {
            anyhow::bail!(
                "`{name}` is being refreshed by {}; nothing was rotated: run the command again in a minute",
                crate::store::claims::Owner::describe(&holder)
            );
        }
        if !told {
            eprintln!(
                "waiting for the refresh of `{name}` in flight ({}) to finish",
                crate::store::claims::Owner::describe(&holder)
            );
            told = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
