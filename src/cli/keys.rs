//! `key generate`, `key rotate`, and the packaging assets.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory;

use super::{Cli, Ctx};
use crate::crypto::{self, Key, KeySource, Keyring};
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
pub fn rotate(ctx: &Ctx, new_key_file: &Path) -> anyhow::Result<i32> {
    let new = Key::from_file(new_key_file, KeySource::File(new_key_file.to_path_buf()))?;
    let mut st = ctx.open_store(Create::No)?;
    // The daemon's own lock, held to the end: a daemon started meanwhile is
    // refused (naming this process) instead of sealing under the retired key.
    let _lock = crate::daemon::lock::StoreLock::acquire(st.path()).map_err(|e| {
        anyhow::anyhow!(
            "{e}; key rotation needs the daemon stopped: stop it (`systemctl stop acutoken`), rotate, point store.key_file or the credential at the new key, then start it again"
        )
    })?;
    let old = st.keyring().clone();
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
    let total: u64 = st
        .sealed_key_usage()?
        .iter()
        .filter(|(id, _)| id != new.id())
        .map(|(_, n)| n)
        .sum();
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut done = 0u64;
    loop {
        // Small batches keep each write transaction well under a second.
        let n = st.reseal_batch(200)?;
        if n == 0 {
            break;
        }
        done += n as u64;
        bar.set_position(done);
    }
    bar.finish_and_clear();
    // A refresh that claimed before the new key was in place and saved since
    // sealed under the old one: wait for any still in flight, then count.
    wait_for_refreshes(&st, patience)?;
    let left: u64 = st
        .sealed_key_usage()?
        .iter()
        .filter(|(id, _)| id != new.id())
        .map(|(_, n)| n)
        .sum();
    if left != 0 {
        anyhow::bail!("{left} values are still sealed under an old key; run the rotation again");
    }
    let spills = reseal_spills(
        &ctx.config,
        st.keyring(),
        &Keyring::new(new.clone(), Vec::new()),
    );
    // From now on only the new key opens the store: a command still using the
    // old one is refused instead of sealing values the new key cannot open.
    st.retire_keys_except(&new)?;
    println!(
        "re-sealed {done} values under key {}; nothing sealed under an old key remains.",
        new.id()
    );
    if spills.resealed > 0 {
        println!(
            "re-sealed {} spilled token(s) waiting to be imported",
            spills.resealed
        );
    }
    for (path, why) in &spills.failed {
        eprintln!(
            "warning: the spill file {} was not re-sealed: it {why}; it will not open under the new key",
            path.display()
        );
    }
    println!(
        "next: make {} the key acutoken finds (store.key_file, the systemd credential, ACUTOKEN_KEY, or acutoken.key beside the store); the old key no longer opens the store: keep it only to read backups made before now",
        new_key_file.display()
    );
    Ok(0)
}

/// Waits until no connection has a live claim (bounded), or refuses.
fn wait_for_refreshes(
    st: &crate::store::Store,
    patience: std::time::Duration,
) -> anyhow::Result<()> {
    let give_up = std::time::Instant::now() + patience;
    let mut told = false;
    loop {
        let now = crate::clock::Clock::now(&crate::clock::SystemClock);
        let live = st
            .claimed()?
            .into_iter()
            .find_map(|r| crate::store::claims::live_claim(&r, now).map(|c| (r.conn.name, c)));
        let Some((name, (holder, _))) = live else {
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

/// What re-sealing the spill files came to.
struct Resealed {
    resealed: usize,
    failed: Vec<(std::path::PathBuf, String)>,
}

/// Re-seals the tokens waiting in spill files (and in `rejected/`) from
/// `from` to `to`, so the next start can import them once the old key is
/// retired.
fn reseal_spills(config: &crate::config::Config, from: &Keyring, to: &Keyring) -> Resealed {
    use crate::renewal::spill;
    let mut out = Resealed {
        resealed: 0,
        failed: Vec::new(),
    };
    for dir in config.spill_dirs() {
        for d in [dir.clone(), dir.join("rejected")] {
            for (path, read) in spill::read_all(&d) {
                let done = read.and_then(|mut s| {
                    s.reseal(from, to)?;
                    spill::rewrite(&path, &s).map_err(|e| format!("cannot be rewritten: {e}"))
                });
                match done {
                    Ok(()) => out.resealed += 1,
                    Err(why) => out.failed.push((path, why)),
                }
            }
        }
    }
    out
}

/// Writes shell completions and the man page (packaging).
pub fn generate_assets(dir: &Path) -> anyhow::Result<i32> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Cli::command();
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, "acutoken", dir)
            .with_context(|| format!("cannot write completions into {}", dir.display()))?;
    }
    let man = clap_mangen::Man::new(cmd);
    let mut buf = Vec::new();
    man.render(&mut buf).context("cannot render the man page")?;
    std::fs::write(dir.join("acutoken.1"), buf)
        .with_context(|| format!("cannot write {}/acutoken.1", dir.display()))?;
    println!("wrote completions and acutoken.1 into {}", dir.display());
    Ok(0)
}
