//! Issue 14: several `acutoken serve` replicas on one PostgreSQL store, each
//! measurement beside one daemon on PostgreSQL and one on SQLite in the same
//! run: catch-up of a due backlog against the ideal, failover after a replica
//! is killed (SIGKILL) or paused (SIGSTOP), the token path of one replica
//! alone and beside two others, and READY, RSS and idle CPU per replica.
//!
//! Needs a PostgreSQL server (`.ci/pg start; . /tmp/acutoken-pg/env`: the
//! `ACUTOKEN_TEST_PG*` variables) and psql. Databases `bench_replicas_*` are
//! dropped and made again for every run. `BASELINE_BIN` (optional) adds a
//! single daemon on PostgreSQL run by that build (one from before replicas).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;

use acutoken::model::Timestamp;

use crate::daemon::settle;
use crate::fixture::{Daemon, Dir, Notify, Spec, binary, command_of, idle_store, name, seed};
use crate::load::{CLIENTS, get, give_access_token, run_oha};
use crate::renewal::{SECRET, answered, client_of, simulator, site_names, site_of};
use crate::{Report, ms};

/// Defaults of renewal.max_concurrent and renewal.per_instance_concurrent.
const MAX_CONCURRENT: usize = 16;
const PER_INSTANCE: usize = 2;

/// The PostgreSQL server of `.ci/pg`.
struct Pg {
    /// `postgres://acutoken@host:port` (no database).
    base: String,
    /// The superuser's URL without a database.
    admin: String,
    password_file: PathBuf,
}

impl Pg {
    fn from_env() -> anyhow::Result<Pg> {
        let var = |k: &str| {
            std::env::var(k).with_context(|| {
                format!(
                    "{k} is not set: start PostgreSQL with `.ci/pg start; . /tmp/acutoken-pg/env`"
                )
            })
        };
        let strip = |u: String| u.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap_or(u);
        Ok(Pg {
            base: strip(var("ACUTOKEN_TEST_PG")?),
            admin: strip(var("ACUTOKEN_TEST_PG_ADMIN")?),
            password_file: var("ACUTOKEN_TEST_PG_PASSWORD_FILE")?.into(),
        })
    }

    fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.base)
    }

    /// Runs `sql` as the superuser in `db`; psql's unaligned output.
    fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new("psql")
            .args(["-qAtX", "-v", "ON_ERROR_STOP=1"])
            .arg(format!("{}/{db}", self.admin))
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .context("cannot run psql (apt-get install postgresql-client)")?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// An empty database `db` owned by acutoken.
    fn fresh(&self, db: &str) -> anyhow::Result<()> {
        self.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        )?;
        self.psql("postgres", &format!("CREATE DATABASE {db} OWNER acutoken"))?;
        Ok(())
    }

    fn drop_db(&self, db: &str) {
        let _ = self.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        );
    }
}

/// Where the daemons under comparison keep the store.
#[derive(Clone)]
struct Setup {
    label: String,
    /// On PostgreSQL; else the directory's SQLite store.
    pg: bool,
    replicas: usize,
    bin: PathBuf,
}

/// Three replicas on PostgreSQL, one daemon on PostgreSQL, one on SQLite, and
/// one on PostgreSQL run by `$BASELINE_BIN` when set.
fn setups(replicas: usize) -> Vec<Setup> {
    let mut v = vec![
        Setup {
            label: format!("pg-x{replicas}"),
            pg: true,
            replicas,
            bin: binary(),
        },
        Setup {
            label: "pg-x1".into(),
            pg: true,
            replicas: 1,
            bin: binary(),
        },
        Setup {
            label: "sqlite-x1".into(),
            pg: false,
            replicas: 1,
            bin: binary(),
        },
    ];
    if let Some(b) = std::env::var_os("BASELINE_BIN") {
        v.push(Setup {
            label: "pg-x1-baseline".into(),
            pg: true,
            replicas: 1,
            bin: b.into(),
        });
    }
    v
}

/// Copies the SQLite store of `dir` (config `dir.config()`) into a fresh
/// database `db` with `bin`'s `store copy`, and writes `pg.toml` for it
/// (`renewal` added to `[renewal]`); its path.
fn to_pg(pg: &Pg, dir: &Dir, db: &str, bin: &Path, renewal: &str) -> anyhow::Result<PathBuf> {
    pg.fresh(db)?;
    let pw = dir.path.join("pgpass");
    std::fs::copy(&pg.password_file, &pw)?;
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let t = Instant::now();
    let out = command_of(bin, &dir.config())
        .args(["store", "copy", "--to"])
        .arg(pg.url(db))
        .arg("--to-password-file")
        .arg(&pw)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "store copy to PostgreSQL failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("store copy to {db}: {:.1} s", t.elapsed().as_secs_f64());
    let config = dir.path.join("pg.toml");
    std::fs::write(
        &config,
        format!(
            r#"[store]
url = "{url}"
password_file = "{pw}"
key_file = "{key}"

[acumatica]
allow_insecure_loopback = true

[renewal]
http_timeout = "10s"
{renewal}

[log]
level = "info"
"#,
            url = pg.url(db),
            pw = pw.display(),
            key = dir.key().display(),
        ),
    )?;
    Ok(config)
}

/// One running `serve`: its socket, notify socket and process.
struct Replica {
    name: String,
    socket: PathBuf,
    notify: Notify,
    d: Daemon,
}

/// Starts replica number `i` of `setup` on `config`: a name, socket and spill
/// directory of its own (a name only where there are several: a build from
/// before replicas knows no `serve.replica_name`).
fn start(setup: &Setup, dir: &Dir, config: &Path, i: usize) -> anyhow::Result<Replica> {
    let name = format!("r{}", i + 1);
    let socket = dir.path.join(format!("{name}.sock"));
    let mut env = vec![
        (
            "ACUTOKEN__API__SOCKET".to_string(),
            socket.display().to_string(),
        ),
        (
            "ACUTOKEN__STORE__SPILL_DIR".to_string(),
            dir.path
                .join(format!("pending-{name}"))
                .display()
                .to_string(),
        ),
    ];
    if setup.replicas > 1 {
        env.push(("ACUTOKEN__SERVE__REPLICA_NAME".into(), name.clone()));
    }
    let notify = Notify::bind_at(dir.path.join(format!("notify-{name}.sock")))?;
    let log = dir.path.join(format!("serve-{name}.log"));
    let d = Daemon::start_with(&setup.bin, config, &notify, &env, &log)?;
    Ok(Replica {
        name,
        socket,
        notify,
        d,
    })
}

/// Waits until every replica has said READY=1; when each did (polled every
/// few milliseconds, so the times are within that of the truth).
fn wait_ready(rs: &[Replica], within: Duration) -> anyhow::Result<Vec<Instant>> {
    let end = Instant::now() + within;
    let mut at: Vec<Option<Instant>> = vec![None; rs.len()];
    while at.iter().any(Option::is_none) {
        if Instant::now() > end {
            bail!("not every replica was ready within {within:?}");
        }
        for (r, a) in rs.iter().zip(at.iter_mut()) {
            if a.is_none()
                && let Ok(t) = r.notify.wait_for("READY=1", Duration::from_millis(5))
            {
                *a = Some(t);
            }
        }
    }
    Ok(at.into_iter().flatten().collect())
}

fn stop_all(rs: Vec<Replica>) -> anyhow::Result<()> {
    for r in rs {
        r.d.stop()?;
    }
    Ok(())
}

/// The 1-minute load average, noted beside each figure (the machine is shared).
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// CPU time the whole machine spent busy and in total so far (all cores,
/// from `/proc/stat`), in clock ticks.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Transactions committed in database `db` so far (the statistics are
/// flushed within a second of a session's last transaction).
fn commits(pg: &Pg, db: &str) -> anyhow::Result<u64> {
    Ok(pg
        .psql(
            "postgres",
            &format!("SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'"),
        )?
        .parse()?)
}

/// Seeds `due.len()` connections at the simulator's sites into `dir`'s SQLite store.
fn seed_due(
    dir: &Dir,
    sim: &acutoken::sim::Simulator,
    tokens: &[String],
    due: &[Timestamp],
    sites: usize,
    issued: Timestamp,
) -> anyhow::Result<()> {
    let mut st = dir.open_store()?;
    seed(&mut st, 0, due.len(), chrono::Utc::now(), |i| Spec {
        name: format!("due{i:06}"),
        instance: sim.instance(&site_of(i, sites)),
        client_id: client_of(i),
        client_secret: SECRET.into(),
        refresh_token: tokens[i].clone(),
        next_refresh_at: Some(due[i]),
        grant_issued_at: issued,
    })?;
    Ok(())
}

/// Connections refreshed at least once, read from the store the setup used.
fn refreshed(pg: &Pg, setup: &Setup, dir: &Dir, db: &str) -> anyhow::Result<usize> {
    if setup.pg {
        Ok(pg
            .psql(
                db,
                "SELECT count(*) FROM connections WHERE last_refresh_at IS NOT NULL",
            )?
            .parse()?)
    } else {
        let st = dir.open_store()?;
        Ok(st
            .list()?
            .iter()
            .filter(|r| r.conn.last_refresh_at.is_some())
            .count())
    }
}

/// Catch-up of `backlog` due connections over `sites` sites answering after
/// `latency`, by each setup in turn (runs alternate between them); the ideal
/// is latency × backlog / min(replicas × max_concurrent, per_instance × sites).
pub fn catchup(
    rt: &tokio::runtime::Runtime,
    backlog: usize,
    sites: usize,
    latency: Duration,
    runs: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let pg = Pg::from_env()?;
    let db = "bench_replicas_catchup";
    for run in 0..runs {
        for s in setups(3) {
            let effective = (s.replicas * MAX_CONCURRENT).min(PER_INSTANCE * sites);
            let ideal = latency.as_secs_f64() * backlog as f64 / effective as f64;
            let now = chrono::Utc::now();
            let issued = now - chrono::Duration::hours(1);
            let (sim, tokens) = simulator(rt, backlog, sites, latency, issued)?;
            let dir = Dir::fresh(&format!("replicas-catchup-{}", s.label))?;
            dir.write_config("", "")?;
            let due = vec![now - chrono::Duration::minutes(1); backlog];
            seed_due(&dir, &sim, &tokens, &due, sites, issued)?;
            let config = if s.pg {
                to_pg(&pg, &dir, db, &s.bin, "")?
            } else {
                dir.config()
            };
            let load = load1();
            let commits0 = if s.pg { commits(&pg, db)? } else { 0 };
            let rs = (0..s.replicas)
                .map(|i| start(&s, &dir, &config, i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ready = wait_ready(&rs, Duration::from_secs(300))?;
            let machine0 = machine_ticks();
            let cpu0: Vec<Duration> = rs.iter().map(|r| r.d.cpu()).collect::<Result<_, _>>()?;
            let first = *ready.iter().min().context("no replica")?;
            let last = *ready.iter().max().context("no replica")?;
            let names = site_names(backlog, sites);
            let t0 = Instant::now();
            let mut drained = None;
            while t0.elapsed() < Duration::from_secs(600) {
                if answered(&sim, &names) >= backlog as u64 {
                    drained = Some(Instant::now());
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let drained = drained.context("the backlog did not drain in 10 minutes")?;
            let machine1 = machine_ticks();
            let mut daemons_cpu = Duration::ZERO;
            for (r, c0) in rs.iter().zip(&cpu0) {
                daemons_cpu += r.d.cpu()? - *c0;
            }
            let started = rs.iter().map(|r| r.d.started).min().context("no replica")?;
            stop_all(rs)?;
            let max_per_instance = names
                .iter()
                .map(|n| sim.max_concurrency(n))
                .max()
                .unwrap_or(0);
            let requests: u64 = names.iter().map(|n| sim.token_requests(n)).sum();
            let txns = if s.pg {
                std::thread::sleep(Duration::from_millis(1500));
                commits(&pg, db)?.saturating_sub(commits0)
            } else {
                0
            };
            let done = refreshed(&pg, &s, &dir, db)?;
            let wall = (drained - first).as_secs_f64();
            let busy = (machine1.0 - machine0.0) as f64 / (machine1.1 - machine0.1).max(1) as f64;
            report.row(
                &format!("replicas-catchup/{}", s.label),
                backlog,
                run,
                &[
                    ("wall_s", wall),
                    ("wall_from_last_ready_s", (drained - last).as_secs_f64()),
                    ("ideal_s", ideal),
                    ("ratio", wall / ideal),
                    ("max_per_instance", max_per_instance as f64),
                    ("limit_per_instance", PER_INSTANCE as f64),
                    ("max_all", sim.max_concurrency_all() as f64),
                    ("limit_all", (s.replicas * MAX_CONCURRENT) as f64),
                    ("requests", requests as f64),
                    ("replays", sim.total_replays() as f64),
                    ("refreshed", done as f64),
                    ("pg_commits_per_refresh", txns as f64 / backlog as f64),
                    ("machine_busy_pct", busy * 100.0),
                    ("daemons_cpu_s", daemons_cpu.as_secs_f64()),
                    ("ready_first_ms", ms(first - started)),
                    ("ready_spread_ms", ms(last - first)),
                    ("load1", load),
                ],
            );
            rt.block_on(sim.shutdown());
        }
    }
    pg.drop_db(db);
    Ok(())
}

/// Failover: three replicas work through a stream of connections due at
/// `rate` a second over `window`, each request answered after `latency`.
/// Some seconds in, replica r2 is stopped (SIGSTOP) and the connections it
/// holds claims on are read from the database; then it is killed (SIGKILL)
/// or left stopped (the lease path). Measured from the stop: the first
/// answer to a survivor's take-over request of one of those connections, the
/// first such answer that was a successful refresh, and the last.
pub fn failover(
    rt: &tokio::runtime::Runtime,
    rate: usize,
    window: Duration,
    latency: Duration,
    runs: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let pg = Pg::from_env()?;
    let db = "bench_replicas_failover";
    let sites = 50;
    let n = (rate as f64 * window.as_secs_f64()) as usize;
    let setup = setups(3).remove(0);
    for run in 0..runs {
        for sig in [Signal::SIGKILL, Signal::SIGSTOP] {
            let now = chrono::Utc::now();
            let issued = now - chrono::Duration::hours(1);
            // Due from well after start-up on.
            let first_due = now + chrono::Duration::seconds(20);
            let due: Vec<Timestamp> = (0..n)
                .map(|i| first_due + chrono::Duration::microseconds((i * 1_000_000 / rate) as i64))
                .collect();
            let (sim, tokens) = simulator(rt, n, sites, latency, issued)?;
            let dir = Dir::fresh("replicas-failover")?;
            dir.write_config("", "")?;
            seed_due(&dir, &sim, &tokens, &due, sites, issued)?;
            let config = to_pg(&pg, &dir, db, &setup.bin, "")?;
            let rs = (0..3)
                .map(|i| start(&setup, &dir, &config, i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            wait_ready(&rs, Duration::from_secs(120))?;
            let into = (first_due + chrono::Duration::seconds(10) - chrono::Utc::now())
                .to_std()
                .unwrap_or_default();
            std::thread::sleep(into);
            let load = load1();
            let victim = &rs[1];
            victim.d.signal(Signal::SIGSTOP)?;
            let t0 = chrono::Utc::now();
            let held: BTreeSet<String> = pg
                .psql(
                    db,
                    &format!(
                        "SELECT c.client_id FROM connections c JOIN acutoken_replicas r \
                         ON c.claim_owner = r.owner \
                         WHERE r.name = '{}' AND c.claim_id IS NOT NULL",
                        victim.name
                    ),
                )?
                .lines()
                .map(str::to_string)
                .collect();
            if sig == Signal::SIGKILL {
                victim.d.signal(Signal::SIGKILL)?;
            }
            let stopped = Instant::now();
            if held.is_empty() {
                eprintln!("run {run} {sig}: r2 held no claims when stopped; run skipped");
            }
            // Taken over and finished: nobody holds a claim on them any more
            // (r2 cannot give its claims back).
            let in_list = held
                .iter()
                .map(|c| format!("'{c}'"))
                .collect::<Vec<_>>()
                .join(",");
            // Past the lease and then some: a take-over that has not come by
            // then is recorded as a stall (its figures NaN), with what the
            // database sessions were doing.
            let limit = Duration::from_secs(90);
            let mut stalled = false;
            while !held.is_empty() {
                let open: usize = pg
                    .psql(
                        db,
                        &format!(
                            "SELECT count(*) FROM connections \
                             WHERE client_id IN ({in_list}) AND claim_id IS NOT NULL"
                        ),
                    )?
                    .parse()?;
                if open == 0 {
                    break;
                }
                if stopped.elapsed() > limit {
                    eprintln!("run {run} {sig}: {open} of r2's claims still held {limit:?} after");
                    stalled = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let sessions = pg.psql(
                db,
                "SELECT pid, state, wait_event_type, wait_event, \
                 round(extract(epoch FROM now() - xact_start)) AS xact_s, left(query, 70) \
                 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )?;
            std::fs::write(dir.path.join("sessions-at-end.txt"), &sessions)?;
            let settled = if stalled {
                f64::NAN
            } else {
                stopped.elapsed().as_secs_f64()
            };
            // The survivors' pace after the stop, beside the planned pace.
            let answers_after = |from: Timestamp, secs: i64| -> u64 {
                let to = from + chrono::Duration::seconds(secs);
                site_names(n, sites)
                    .iter()
                    .flat_map(|site| sim.requests(site))
                    .filter(|r| r.at > from && r.at <= to)
                    .count() as u64
            };
            // The take-over request of each: the replay if r2's own request
            // was answered (its token rotated: the re-send replays it, by the
            // orphan rule), else the last request answered after the stop.
            // None when the take-over never came (r2's own answers are then
            // all there is, and they are no take-over).
            let mut takeover: BTreeMap<String, (Timestamp, u16, bool)> = BTreeMap::new();
            for site in site_names(n, sites).into_iter().filter(|_| !stalled) {
                for r in sim.requests(&site) {
                    let Some(c) = r.client_id.clone() else {
                        continue;
                    };
                    if !held.contains(&c) || r.at <= t0 {
                        continue;
                    }
                    let e = takeover.entry(c).or_insert((r.at, r.status, r.replay));
                    if !e.2 && (r.replay || r.at > e.0) {
                        *e = (r.at, r.status, r.replay);
                    }
                }
            }
            let since = |t: Timestamp| (t - t0).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
            let first = takeover
                .values()
                .map(|v| since(v.0))
                .fold(f64::NAN, f64::min);
            let first_ok = takeover
                .values()
                .filter(|v| v.1 == 200)
                .map(|v| since(v.0))
                .fold(f64::NAN, f64::min);
            let last = takeover
                .values()
                .map(|v| since(v.0))
                .fold(f64::NAN, f64::max);
            let ok = takeover.values().filter(|v| v.1 == 200).count();
            let replayed = takeover.values().filter(|v| v.2).count();
            // The 20 s after the stop are over before they are counted.
            let window_end = stopped + Duration::from_secs(20);
            std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
            let mut after_cont = f64::NAN;
            if sig == Signal::SIGSTOP {
                victim.d.signal(Signal::SIGCONT)?;
                let cont = chrono::Utc::now();
                std::thread::sleep(Duration::from_secs(10));
                after_cont = answers_after(cont, 10) as f64;
            }
            let answered_20s = answers_after(t0, 20);
            stop_all(rs)?;
            let label = if sig == Signal::SIGKILL {
                "kill"
            } else {
                "stop"
            };
            report.row(
                &format!("replicas-failover/{label}"),
                n,
                run,
                &[
                    ("held", held.len() as f64),
                    ("first_takeover_s", first),
                    ("first_ok_s", first_ok),
                    ("last_takeover_s", last),
                    ("all_settled_s", settled),
                    ("stalled", f64::from(u8::from(stalled))),
                    ("answers_20s_after", answered_20s as f64),
                    ("answers_planned_20s", (rate * 20) as f64),
                    ("answers_10s_after_cont", after_cont),
                    (
                        "taken_over",
                        if stalled {
                            f64::NAN
                        } else {
                            takeover.len() as f64
                        },
                    ),
                    ("ok", ok as f64),
                    ("replayed", replayed as f64),
                    ("latency_ms", ms(latency)),
                    ("load1", load),
                ],
            );
            rt.block_on(sim.shutdown());
        }
    }
    pg.drop_db(db);
    Ok(())
}

/// The token path of replica r1 on a store of `n`: alone, then with two
/// more replicas running; a daemon on the same store in SQLite; and
/// `$BASELINE_BIN` alone on PostgreSQL when set.
pub fn token(n: usize, runs: usize, secs: u64, report: &mut Report) -> anyhow::Result<()> {
    let pg = Pg::from_env()?;
    let db = "bench_replicas_token";
    let seeded = idle_store(n)?;
    let dir = Dir::fresh(&format!("replicas-token-{n}"))?;
    dir.copy_store_from(&seeded)?;
    dir.write_config("", "")?;
    let who = name(n / 2);
    give_access_token(&dir, &who)?;
    let path = format!("/v1/connections/{who}/token");
    let url = format!("http://localhost{path}");
    let replicas = setups(3).remove(0);
    let config = to_pg(&pg, &dir, db, &replicas.bin, "")?;

    let measure = |report: &mut Report, what: &str, r: &Replica| -> anyhow::Result<()> {
        settle(&r.d, Duration::from_secs(120))?;
        let (status, body) = get(&r.socket, &path)?;
        if status != 200 {
            bail!(
                "{what}: the token request answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        for run in 0..runs {
            for c in CLIENTS {
                let load = load1();
                let l = run_oha(&r.socket, &url, c, secs)?;
                report.row(
                    &format!("replicas-token/{what}/c{c}"),
                    n,
                    run,
                    &[
                        ("rps", l.rps),
                        ("p50_ms", ms(l.p50)),
                        ("p99_ms", ms(l.p99)),
                        ("ok", l.ok as f64),
                        ("not_ok", l.other as f64),
                        ("load1", load),
                    ],
                );
            }
        }
        Ok(())
    };

    // r1 alone on PostgreSQL: it starts as a replica all the same.
    let mut rs = vec![start(&replicas, &dir, &config, 0)?];
    wait_ready(&rs, Duration::from_secs(300))?;
    measure(report, "pg-alone", &rs[0])?;
    for i in 1..3 {
        rs.push(start(&replicas, &dir, &config, i)?);
    }
    wait_ready(&rs[1..], Duration::from_secs(300))?;
    for r in &rs[1..] {
        settle(&r.d, Duration::from_secs(120))?;
    }
    measure(report, "pg-with-2-more", &rs[0])?;
    stop_all(rs)?;

    let sqlite = setups(3).remove(2);
    let rs = vec![start(&sqlite, &dir, &dir.config(), 0)?];
    wait_ready(&rs, Duration::from_secs(300))?;
    measure(report, "sqlite", &rs[0])?;
    stop_all(rs)?;

    // The build from before replicas, alone on a database of its own making.
    if let Some(baseline) = setups(3).into_iter().find(|s| s.label == "pg-x1-baseline") {
        let config = to_pg(&pg, &dir, db, &baseline.bin, "")?;
        let rs = vec![start(&baseline, &dir, &config, 0)?];
        wait_ready(&rs, Duration::from_secs(300))?;
        measure(report, "pg-baseline", &rs[0])?;
        stop_all(rs)?;
    }
    pg.drop_db(db);
    Ok(())
}

/// READY and RSS per replica on a store of `n` (replicas started one after
/// the other), then idle CPU over `idle` with both running; beside one
/// daemon on PostgreSQL and one on SQLite (and `$BASELINE_BIN` on
/// PostgreSQL), each measured alone.
pub fn serve(n: usize, runs: usize, idle: Duration, report: &mut Report) -> anyhow::Result<()> {
    let pg = Pg::from_env()?;
    let base = Dir::fresh(&format!("replicas-serve-{n}"))?;
    let records = base.path.join("records.json");
    crate::gen_import(n, &records.display().to_string())?;
    for run in 0..runs {
        for s in setups(2) {
            // Each run imports afresh: the plans start from the import.
            let dir = Dir::fresh(&format!("replicas-serve-{n}-{}", s.label))?;
            dir.write_config("", "")?;
            drop(dir.keyring()?);
            let out = command_of(&binary(), &dir.config())
                .args(["connection", "import"])
                .arg(&records)
                .stdin(Stdio::null())
                .output()?;
            if !out.status.success() {
                bail!("import failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let db = format!("bench_replicas_serve_{n}");
            let config = if s.pg {
                to_pg(&pg, &dir, &db, &s.bin, "")?
            } else {
                dir.config()
            };
            let mut rs: Vec<Replica> = Vec::new();
            let mut figures = Vec::new();
            for i in 0..s.replicas {
                let load = load1();
                let r = start(&s, &dir, &config, i)?;
                let ready = wait_ready(std::slice::from_ref(&r), Duration::from_secs(600))?[0];
                figures.push((ms(ready - r.d.started), load));
                rs.push(r);
            }
            std::thread::sleep(Duration::from_secs(10));
            let rss10: Vec<(u64, u64)> =
                rs.iter().map(|r| r.d.rss_kib()).collect::<Result<_, _>>()?;
            for r in &rs {
                settle(&r.d, Duration::from_secs(120))?;
            }
            let load = load1();
            let cpu0: Vec<Duration> = rs.iter().map(|r| r.d.cpu()).collect::<Result<_, _>>()?;
            let t0 = Instant::now();
            std::thread::sleep(idle);
            let wall = t0.elapsed().as_secs_f64();
            for (i, r) in rs.iter().enumerate() {
                let (rss, peak) = rss10[i];
                let (rss_end, _) = r.d.rss_kib()?;
                let cpu = (r.d.cpu()? - cpu0[i]).as_secs_f64();
                report.row(
                    &format!("replicas-serve/{}/{}", s.label, r.name),
                    n,
                    run,
                    &[
                        ("ready_ms", figures[i].0),
                        ("rss_mib", rss as f64 / 1024.0),
                        ("peak_rss_mib", peak as f64 / 1024.0),
                        ("rss_after_idle_mib", rss_end as f64 / 1024.0),
                        ("idle_cpu_pct", cpu / wall * 100.0),
                        ("idle_cpu_ms", cpu * 1e3),
                        ("load1_start", figures[i].1),
                        ("load1_idle", load),
                    ],
                );
            }
            stop_all(rs)?;
            if s.pg {
                pg.drop_db(&db);
            }
            std::fs::remove_dir_all(&dir.path)?;
        }
    }
    std::fs::remove_file(&records)?;
    Ok(())
}
