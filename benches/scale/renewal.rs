//! Measurements 6 to 8, against the simulator in this process and the real
//! daemon as a child: catch-up of a due backlog under the concurrency limits,
//! lateness of planned refreshes among 100k scheduled connections, and the
//! CPU time and fsyncs one refresh costs.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use acutoken::model::Timestamp;
use acutoken::sim::Simulator;

use crate::daemon::settle;
use crate::fixture::{Daemon, Dir, Notify, Spec, idle_store, seed};
use crate::{Report, ms};

pub const SECRET: &str = "bench-client-secret";

/// One renewal scenario.
pub struct Scenario {
    /// Idle connections beside the due ones (a copy of the seeded store).
    pub idle: usize,
    /// When each due connection is planned to refresh.
    pub due: Vec<Timestamp>,
    /// Simulated Acumatica instances the due connections are spread over.
    pub sites: usize,
    /// Every token request is answered after this long.
    pub latency: Duration,
    /// Count fsyncs with strace attached from READY on.
    pub strace: bool,
    /// Lines added to the config's `[renewal]` (limits); empty for the defaults.
    pub renewal: String,
}

/// What a scenario came to.
pub struct Outcome {
    pub ready: Duration,
    /// From READY to the last due connection's token answer.
    pub drain: Duration,
    /// From the first planned refresh (or READY, if later) to the last answer.
    pub busy: Duration,
    /// Lateness of each request: answered minus planned, in seconds.
    pub late: Vec<f64>,
    pub max_per_site: u64,
    pub max_all: u64,
    pub requests: u64,
    /// Requests answered 200.
    pub answered_ok: u64,
    /// Requests that sent a refresh token already used (the grant died).
    pub replays: u64,
    pub refreshed_ok: usize,
    /// Daemon CPU from settled after READY until settled after the last refresh.
    pub cpu: Duration,
    /// Daemon CPU from the same start until the last answer.
    pub cpu_to_drain: Duration,
    /// The span `cpu` was measured over.
    pub cpu_span: Duration,
    pub cpu_idle_rate: f64,
    pub fsyncs: Option<Fsyncs>,
}

/// fsync and fdatasync calls an strace run saw, by the file they flushed.
#[derive(Clone, Copy, Default)]
pub struct Fsyncs {
    /// A SQLite write-ahead log (`*-wal`): one per commit.
    pub wal: u64,
    /// A database file itself (`*.db`): checkpoints.
    pub db: u64,
    /// Anything else: a directory (SQLite syncs the store's directory once,
    /// when the WAL file is first written after it was opened), the daemon's
    /// lock file, a journal.
    pub other: u64,
}

impl Fsyncs {
    pub fn total(&self) -> u64 {
        self.wal + self.db + self.other
    }

    /// Counts the calls in a trace written by `strace -y` (without `-c`): a
    /// call is the line that starts it (`fsync(9</path>) = 0`, or the same
    /// with `<unfinished ...>`); a `<... fsync resumed>` line is not another.
    pub fn parse(trace: &str) -> Fsyncs {
        let mut n = Fsyncs::default();
        for line in trace.lines() {
            let Some(at) = line.find("fsync(").or_else(|| line.find("fdatasync(")) else {
                continue;
            };
            let args = &line[at..];
            let path = args
                .split_once('<')
                .and_then(|(_, r)| r.split_once('>'))
                .map_or("", |(p, _)| p);
            if path.ends_with("-wal") {
                n.wal += 1;
            } else if path.ends_with(".db") {
                n.db += 1;
            } else {
                n.other += 1;
            }
        }
        n
    }
}

pub fn client_of(i: usize) -> String {
    format!("{i:08X}-A48D-A50E-F710-39C1636C30F6@Bench")
}

pub fn site_of(i: usize, sites: usize) -> String {
    format!("s{}", i % sites)
}

/// The sites `n` connections are spread over.
pub fn site_names(n: usize, sites: usize) -> Vec<String> {
    (0..sites.min(n)).map(|k| site_of(k, sites)).collect()
}

/// A simulator with `n` clients over `sites` sites answering after
/// `latency`, each holding a grant issued at `issued`; and their refresh tokens.
pub fn simulator(
    rt: &tokio::runtime::Runtime,
    n: usize,
    sites: usize,
    latency: Duration,
    issued: Timestamp,
) -> anyhow::Result<(Simulator, Vec<String>)> {
    let clock = acutoken::clock::system();
    let sim = rt.block_on(Simulator::start(clock))?;
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let site = site_of(i, sites);
        sim.add_client(&site, &client_of(i), SECRET, None);
        tokens.push(sim.issue_grant(&site, &client_of(i), issued)?);
    }
    for site in site_names(n, sites) {
        sim.set_latency(&site, latency);
    }
    Ok((sim, tokens))
}

/// Token requests the simulator has finished answering on `sites`.
pub fn answered(sim: &Simulator, sites: &[String]) -> u64 {
    sites
        .iter()
        .map(|s| sim.token_requests(s) - sim.in_flight(s))
        .sum()
}

/// The strace arguments that log every fsync and fdatasync with the file
/// it flushed (`-y`) into the file named next.
pub const STRACE_FSYNCS: [&str; 6] = ["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o"];

/// Starts strace logging the fsyncs of `pid` and its threads into `out`;
/// attached once this returns.
pub fn attach_strace(pid: nix::unistd::Pid, out: &std::path::Path) -> anyhow::Result<Child> {
    let child = Command::new("strace")
        .args(STRACE_FSYNCS)
        .arg(out)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run strace (apt-get install strace)")?;
    // strace attaches every thread before it counts anything.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

/// Stops an attached strace and returns the fsyncs it saw.
pub fn detach_strace(mut child: Child, out: &std::path::Path) -> anyhow::Result<Fsyncs> {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id())?),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = child.wait();
    Ok(Fsyncs::parse(&std::fs::read_to_string(out)?))
}

/// Runs one scenario in directory `name`.
pub fn run(rt: &tokio::runtime::Runtime, name: &str, sc: &Scenario) -> anyhow::Result<Outcome> {
    let now = chrono::Utc::now();
    let issued = now - chrono::Duration::hours(1);
    let (sim, tokens) = simulator(rt, sc.due.len(), sc.sites, sc.latency, issued)?;
    let dir = Dir::fresh(name)?;
    if sc.idle > 0 {
        dir.copy_store_from(&idle_store(sc.idle)?)?;
    }
    dir.write_config(&sc.renewal, "")?;
    let planned: HashMap<String, Timestamp> = sc
        .due
        .iter()
        .enumerate()
        .map(|(i, t)| (client_of(i), *t))
        .collect();
    {
        let mut st = dir.open_store()?;
        seed(&mut st, 0, sc.due.len(), now, |i| Spec {
            name: format!("due{i:06}"),
            instance: sim.instance(&site_of(i, sc.sites)),
            client_id: client_of(i),
            client_secret: SECRET.into(),
            refresh_token: tokens[i].clone(),
            next_refresh_at: Some(sc.due[i]),
            grant_issued_at: issued,
        })?;
    }

    let notify = Notify::bind(&dir)?;
    let d = Daemon::start(&dir, &notify)?;
    let ready_at = notify.wait_for("READY=1", Duration::from_secs(600))?;
    let ready = ready_at - d.started;
    let mut tracer = if sc.strace {
        let out = dir.path.join("strace.txt");
        Some((attach_strace(d.pid, &out)?, out))
    } else {
        None
    };
    let first_due = sc.due.iter().min().copied().unwrap_or(now);
    if first_due - chrono::Utc::now() > chrono::Duration::seconds(5) {
        // Start-up work is not refresh work.
        settle(&d, Duration::from_secs(30))?;
    }
    let cpu0 = d.cpu()?;
    let cpu_from = Instant::now();
    let due_from = match (first_due - chrono::Utc::now()).to_std() {
        Ok(ahead) => Instant::now() + ahead,
        Err(_) => ready_at,
    };
    let total = sc.due.len() as u64;
    let sites = site_names(sc.due.len(), sc.sites);
    let last_due = sc.due.iter().max().copied().unwrap_or(now);
    let limit =
        (last_due - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(600);
    let t0 = Instant::now();
    let mut drained = None;
    while t0.elapsed() < limit {
        if answered(&sim, &sites) >= total {
            drained = Some(Instant::now());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let drained = drained.context("the backlog did not drain")?;
    let cpu_to_drain = d.cpu()? - cpu0;
    settle(&d, Duration::from_secs(120))?;
    let cpu = d.cpu()? - cpu0;
    let cpu_span = cpu_from.elapsed();
    // The idle cost over the same span, to tell refresh work from the rest.
    let c1 = d.cpu()?;
    std::thread::sleep(Duration::from_secs(5));
    let cpu_idle_rate = (d.cpu()? - c1).as_secs_f64() / 5.0;
    let fsyncs = match tracer.take() {
        Some((child, out)) => Some(detach_strace(child, &out)?),
        None => None,
    };
    d.stop()?;

    let mut late = Vec::new();
    let mut requests = 0;
    let mut answered_ok = 0;
    let mut max_per_site = 0;
    for s in &sites {
        for r in sim.requests(s) {
            requests += 1;
            answered_ok += u64::from(r.status == 200);
            if let Some(p) = r.client_id.as_ref().and_then(|c| planned.get(c)) {
                late.push((r.at - *p).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6);
            }
        }
        max_per_site = max_per_site.max(sim.max_concurrency(s));
    }
    let max_all = sim.max_concurrency_all();
    let replays = sim.total_replays();
    let st = dir.open_store()?;
    let refreshed_ok = st
        .list()?
        .iter()
        .filter(|r| r.conn.name.starts_with("due") && r.conn.last_refresh_at.is_some())
        .count();
    rt.block_on(sim.shutdown());
    Ok(Outcome {
        ready,
        drain: drained - ready_at,
        busy: drained.saturating_duration_since(due_from.max(ready_at)),
        late,
        max_per_site,
        max_all,
        requests,
        answered_ok,
        replays,
        refreshed_ok,
        cpu,
        cpu_to_drain,
        cpu_span,
        cpu_idle_rate,
        fsyncs,
    })
}

/// Percentile `p` (0..=100) of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Measurement 6: `backlog` due connections over `sites` instances answering after `latency`.
pub fn catchup(
    rt: &tokio::runtime::Runtime,
    backlog: usize,
    sites: usize,
    latency: Duration,
    runs: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Defaults of renewal.max_concurrent and renewal.per_instance_concurrent.
    let (global, per_instance) = (16usize, 2usize);
    let effective = global.min(per_instance * sites);
    let ideal = latency.as_secs_f64() * backlog as f64 / effective as f64;
    for run in 0..runs {
        let past = chrono::Utc::now() - chrono::Duration::minutes(1);
        let sc = Scenario {
            idle: 0,
            due: vec![past; backlog],
            sites,
            latency,
            strace: false,
            renewal: String::new(),
        };
        let o = self::run(rt, "catchup", &sc)?;
        report.row(
            "catchup",
            backlog,
            run,
            &[
                ("wall_s", o.drain.as_secs_f64()),
                ("ideal_s", ideal),
                ("ratio", o.drain.as_secs_f64() / ideal),
                ("max_per_instance", o.max_per_site as f64),
                ("limit_per_instance", per_instance as f64),
                ("max_all", o.max_all as f64),
                ("limit_all", global as f64),
                ("requests", o.requests as f64),
                ("refreshed", o.refreshed_ok as f64),
                ("ready_ms", ms(o.ready)),
            ],
        );
    }
    Ok(())
}

/// Measurement 7: `due` refreshes planned over `window` among `n` scheduled connections.
pub fn lateness(
    rt: &tokio::runtime::Runtime,
    n: usize,
    due: usize,
    window: Duration,
    runs: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    for run in 0..runs {
        // Far enough ahead that start-up is over before the first is due.
        let lead = chrono::Duration::seconds(40);
        let first = chrono::Utc::now() + lead;
        let step = window.as_secs_f64() / due as f64;
        let plan = (0..due)
            .map(|i| first + chrono::Duration::microseconds((i as f64 * step * 1e6) as i64))
            .collect();
        let sc = Scenario {
            idle: n,
            due: plan,
            sites: 100,
            latency: Duration::ZERO,
            strace: false,
            renewal: String::new(),
        };
        let mut o = self::run(rt, "lateness", &sc)?;
        o.late.sort_by(f64::total_cmp);
        report.row(
            "lateness",
            n,
            run,
            &[
                ("p50_ms", pct(&o.late, 50.0) * 1e3),
                ("p99_ms", pct(&o.late, 99.0) * 1e3),
                ("max_ms", o.late.last().copied().unwrap_or(f64::NAN) * 1e3),
                ("min_ms", o.late.first().copied().unwrap_or(f64::NAN) * 1e3),
                ("refreshes", o.late.len() as f64),
                ("refreshed", o.refreshed_ok as f64),
            ],
        );
    }
    Ok(())
}

/// Measurement 8: CPU time and fsyncs per refresh, `count` refreshes in a store of `n`.
pub fn cost(
    rt: &tokio::runtime::Runtime,
    n: usize,
    count: usize,
    runs: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    for run in 0..=runs {
        // The last run counts fsyncs; strace slows it, so its CPU is not used.
        let strace = run == runs;
        let at = chrono::Utc::now() + chrono::Duration::seconds(30);
        let sc = Scenario {
            idle: n,
            due: vec![at; count],
            sites: (count / 10).max(1),
            latency: Duration::ZERO,
            strace,
            renewal: String::new(),
        };
        let o = self::run(rt, "cost", &sc)?;
        let c = count as f64;
        if strace {
            report.row(
                "cost/fsync",
                n,
                0,
                &[
                    (
                        "fsyncs_per_refresh",
                        o.fsyncs.unwrap_or_default().total() as f64 / c,
                    ),
                    ("refreshed", o.refreshed_ok as f64),
                ],
            );
        } else {
            let wall = o.busy.as_secs_f64();
            let background = o.cpu_idle_rate * o.cpu_span.as_secs_f64();
            report.row(
                "cost/cpu",
                n,
                run,
                &[
                    ("cpu_ms_per_refresh", o.cpu.as_secs_f64() * 1e3 / c),
                    (
                        "cpu_ms_per_refresh_less_idle",
                        (o.cpu.as_secs_f64() - background).max(0.0) * 1e3 / c,
                    ),
                    ("refreshes_per_s", c / wall.max(1e-9)),
                    ("refreshed", o.refreshed_ok as f64),
                ],
            );
        }
    }
    Ok(())
}
