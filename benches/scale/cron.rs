//! Measurement 6b (issue 13): catch-up under the daemon's concurrency limits
//! beside a cron script doing the same job, `benches/cron_refresh.py`, runs
//! alternated in one invocation against the same simulator set-up: the same
//! clients, grants, sites and latency, a fresh simulator per run.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

use crate::fixture::{Dir, cpu_of};
use crate::renewal::{self, Fsyncs, Scenario, answered, client_of, simulator, site_names, site_of};
use crate::{Report, ms};

/// The daemon's `renewal.max_concurrent` and `renewal.per_instance_concurrent`.
pub struct Limits {
    pub global: usize,
    pub per_instance: usize,
}

/// How long the script may take before the run is called failed.
const SCRIPT_LIMIT: Duration = Duration::from_secs(600);

/// What one run of the script came to.
struct CronOutcome {
    /// From spawn to the last token answer.
    wall: Duration,
    /// From spawn to its exit (its last commit is before that).
    exit: Duration,
    /// utime + stime of the script, all its threads, read once it has exited.
    cpu: Duration,
    requests: u64,
    answered_ok: u64,
    replays: u64,
    max_per_site: u64,
    max_all: u64,
    /// Rows the script says it committed a new token for.
    saved: u64,
    fsyncs: Option<Fsyncs>,
}

fn script() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/cron_refresh.py"
    ))
}

/// The interpreter itself, `$PYTHON` (default `python3`) resolved through
/// `sys.executable`: a wrapper such as a pyenv shim would add its own start-up
/// to the script's CPU and wall time.
fn python() -> anyhow::Result<String> {
    let name = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&name)
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .with_context(|| format!("cannot run {name} (set PYTHON)"))?;
    let exe = String::from_utf8(out.stdout)?.trim().to_string();
    if !out.status.success() || exe.is_empty() {
        bail!("{name} does not name its interpreter (set PYTHON)");
    }
    Ok(exe)
}

/// One run of the script on `backlog` due rows, as the simulator has them;
/// under `strace -c` when `strace` (its CPU is then strace's and not kept).
fn cron(
    rt: &tokio::runtime::Runtime,
    backlog: usize,
    sites: usize,
    latency: Duration,
    workers: usize,
    strace: bool,
) -> anyhow::Result<CronOutcome> {
    let python = python()?;
    let issued = chrono::Utc::now() - chrono::Duration::hours(1);
    let (sim, tokens) = simulator(rt, backlog, sites, latency, issued)?;
    let dir = Dir::fresh("catchup-cron")?;
    let db = dir.path.join("cron.db");

    // The script's own table: the same connections, secrets in plain text.
    let mut rows = String::new();
    for (i, token) in tokens.iter().enumerate() {
        writeln!(
            rows,
            "due{i:06}\t{}\t{}\t{}\t{token}",
            sim.token_url(&site_of(i, sites)),
            client_of(i),
            renewal::SECRET,
        )?;
    }
    let mut seed = Command::new(&python)
        .arg(script())
        .arg(&db)
        .arg("seed")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {python}"))?;
    seed.stdin
        .take()
        .context("no stdin for the seeding script")?
        .write_all(rows.as_bytes())?;
    if !seed.wait()?.success() {
        bail!("cron_refresh.py seed failed");
    }

    let trace = dir.path.join("strace.txt");
    let mut cmd = if strace {
        let mut c = Command::new("strace");
        c.args(renewal::STRACE_FSYNCS)
            .arg(&trace)
            .arg("--")
            .arg(&python);
        c
    } else {
        Command::new(&python)
    };
    let log = std::fs::File::create(dir.path.join("cron.log"))?;
    cmd.arg(script())
        .arg(&db)
        .arg("run")
        .arg(workers.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    let total = backlog as u64;
    let names = site_names(backlog, sites);
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("cannot run the cron script")?;
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    // Waited for without reaping (WNOWAIT): its /proc/PID/stat then still
    // holds the CPU of every thread it ran, which is what getrusage would
    // report for it once reaped.
    let exited = |flags: WaitPidFlag| -> anyhow::Result<bool> {
        let st = waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | flags,
        )?;
        Ok(!matches!(st, WaitStatus::StillAlive))
    };
    let mut wall = None;
    while t0.elapsed() < SCRIPT_LIMIT {
        if answered(&sim, &names) >= total {
            wall = Some(t0.elapsed());
            break;
        }
        if exited(WaitPidFlag::WNOHANG)? {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let Some(wall) = wall else {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "the cron script did not get every answer (see {})",
            dir.path.join("cron.log").display()
        );
    };
    exited(WaitPidFlag::empty())?;
    let exit = t0.elapsed();
    let cpu = if strace { Duration::ZERO } else { cpu_of(pid)? };
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("no stdout from the cron script")?
        .read_to_string(&mut out)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("the cron script failed ({status}); its output: {out}");
    }
    let summary: serde_json::Value = serde_json::from_str(out.trim())
        .with_context(|| format!("unreadable summary from the cron script: {out}"))?;
    let saved = summary["ok"].as_u64().unwrap_or(0);
    let fsyncs = if strace {
        Some(Fsyncs::parse(&std::fs::read_to_string(&trace)?))
    } else {
        None
    };

    let mut requests = 0;
    let mut answered_ok = 0;
    let mut max_per_site = 0;
    for s in &names {
        for r in sim.requests(s) {
            requests += 1;
            answered_ok += u64::from(r.status == 200);
        }
        max_per_site = max_per_site.max(sim.max_concurrency(s));
    }
    let outcome = CronOutcome {
        wall,
        exit,
        cpu,
        requests,
        answered_ok,
        replays: sim.total_replays(),
        max_per_site,
        max_all: sim.max_concurrency_all(),
        saved,
        fsyncs,
    };
    rt.block_on(sim.shutdown());
    Ok(outcome)
}

/// `backlog` due connections over `sites` instances answering after
/// `latency`: the daemon under `limits` and the cron script with
/// `limits.global` workers, `runs` times each, alternated; then one run of
/// each under strace for fsyncs per refresh, and one lone refresh.
pub fn catchup_beside_cron(
    rt: &tokio::runtime::Runtime,
    backlog: usize,
    sites: usize,
    latency: Duration,
    runs: usize,
    limits: Limits,
    report: &mut Report,
) -> anyhow::Result<()> {
    let effective = limits.global.min(limits.per_instance * sites);
    let ideal = latency.as_secs_f64() * backlog as f64 / effective as f64;
    let bench = format!("catchup{}", limits.global);
    let (daemon_row, cron_row) = (format!("{bench}/acutoken"), format!("{bench}/cron"));
    let config = format!(
        "max_concurrent = {}\nper_instance_concurrent = {}\n",
        limits.global, limits.per_instance
    );
    let scenario = |due: chrono::DateTime<chrono::Utc>, n: usize, strace: bool| Scenario {
        idle: 0,
        due: vec![due; n],
        sites,
        latency,
        strace,
        renewal: config.clone(),
    };
    let past = || chrono::Utc::now() - chrono::Duration::minutes(1);
    for run in 0..runs {
        let o = renewal::run(rt, &bench, &scenario(past(), backlog, false))?;
        let wall = o.drain.as_secs_f64();
        report.row(
            &daemon_row,
            backlog,
            run,
            &[
                ("wall_s", wall),
                ("ideal_s", ideal),
                ("ratio", wall / ideal),
                ("cpu_s", o.cpu.as_secs_f64()),
                ("cpu_to_last_answer_s", o.cpu_to_drain.as_secs_f64()),
                ("max_per_instance", o.max_per_site as f64),
                ("limit_per_instance", limits.per_instance as f64),
                ("max_all", o.max_all as f64),
                ("limit_all", limits.global as f64),
                ("requests", o.requests as f64),
                ("answered_ok", o.answered_ok as f64),
                ("replays", o.replays as f64),
                ("refreshed", o.refreshed_ok as f64),
                ("ready_ms", ms(o.ready)),
            ],
        );

        let c = cron(rt, backlog, sites, latency, limits.global, false)?;
        let wall = c.wall.as_secs_f64();
        report.row(
            &cron_row,
            backlog,
            run,
            &[
                ("wall_s", wall),
                ("ideal_s", ideal),
                ("ratio", wall / ideal),
                ("cpu_s", c.cpu.as_secs_f64()),
                ("exit_s", c.exit.as_secs_f64()),
                ("max_per_instance", c.max_per_site as f64),
                ("max_all", c.max_all as f64),
                ("workers", limits.global as f64),
                ("requests", c.requests as f64),
                ("answered_ok", c.answered_ok as f64),
                ("replays", c.replays as f64),
                ("saved", c.saved as f64),
            ],
        );
    }

    // fsyncs: strace slows what it traces, so these runs give no times. The
    // daemon's backlog comes due 10 s after seeding, once strace is attached
    // (from READY on) and start-up is over, so every refresh is counted.
    let soon = || chrono::Utc::now() + chrono::Duration::seconds(10);
    let fsync_row = |report: &mut Report, row: &str, n: usize, f: Option<Fsyncs>, done: f64| {
        let f = f.unwrap_or_default();
        report.row(
            &format!("{bench}/{row}"),
            n,
            0,
            &[
                ("fsyncs_per_refresh", f.total() as f64 / n as f64),
                ("fsyncs", f.total() as f64),
                ("wal", f.wal as f64),
                ("db", f.db as f64),
                ("other", f.other as f64),
                ("refreshed", done),
            ],
        );
    };
    let o = renewal::run(rt, &bench, &scenario(soon(), backlog, true))?;
    fsync_row(
        report,
        "fsync-acutoken",
        backlog,
        o.fsyncs,
        o.refreshed_ok as f64,
    );
    let o = renewal::run(rt, &bench, &scenario(soon(), 1, true))?;
    fsync_row(
        report,
        "fsync-acutoken-lone",
        1,
        o.fsyncs,
        o.refreshed_ok as f64,
    );
    let c = cron(rt, backlog, sites, latency, limits.global, true)?;
    fsync_row(report, "fsync-cron", backlog, c.fsyncs, c.saved as f64);

    let m = |row: &str, field: &str| report.median(row, backlog, field).unwrap_or(f64::NAN);
    let (dw, dc) = (m(&daemon_row, "wall_s"), m(&daemon_row, "cpu_s"));
    let (cw, cc) = (m(&cron_row, "wall_s"), m(&cron_row, "cpu_s"));
    let ce = m(&cron_row, "exit_s");
    let f = |row: &str, n: usize| {
        report
            .median(&format!("{bench}/{row}"), n, "fsyncs_per_refresh")
            .unwrap_or(f64::NAN)
    };
    let note = format!(
        "side by side, medians of {runs}: acutoken wall {dw:.3} s ({:.2} x ideal {ideal:.4} s), \
         CPU {dc:.2} s | cron script wall {cw:.3} s ({:.2} x ideal; exit, every token \
         saved, {ce:.3} s), CPU {cc:.2} s | \
         acutoken / cron: wall {:.2}, CPU {:.2} | fsyncs per refresh: acutoken {:.2} \
         (lone refresh {:.0}), cron {:.2}",
        dw / ideal,
        cw / ideal,
        dw / cw,
        dc / cc,
        f("fsync-acutoken", backlog),
        f("fsync-acutoken-lone", 1),
        f("fsync-cron", backlog),
    );
    report.note(note);
    Ok(())
}
