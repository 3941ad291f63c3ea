//! acutoken's scale and speed benchmarks (issue 6). Run through `benches/run`,
//! which builds the release binary and the tools, or directly:
//!
//! ```text
//! cargo bench --bench scale -- <command> [args]
//! ```
//!
//! Every figure is printed as one JSON line per run (and appended to
//! `$BENCH_DIR/results.jsonl`), then as medians. Nothing here asserts a
//! timing: the figures go into BENCHMARKS.md.

mod cron;
mod daemon;
mod fixture;
mod load;
mod renewal;
mod replicas;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use anyhow::{Context as _, bail};

const USAGE: &str = "usage: scale <command> [args]
  gen N FILE                       write an import file of N connections
  serve N [RUNS] [IDLE_SECS]       start to READY=1, RSS, idle CPU, SIGHUP reload
  token N [RUNS] [SECS]            token path with oha at 1, 8, 64 clients, and nginx
  catchup [BACKLOG] [SITES] [LATENCY_MS] [RUNS]
  catchup64 [BACKLOG] [SITES] [LATENCY_MS] [RUNS] [MAX_CONCURRENT] [PER_INSTANCE]
                                   catch-up under these limits (default 2000 100 50 3 64 2),
                                   runs alternated with benches/cron_refresh.py
  lateness N [DUE] [WINDOW_SECS] [RUNS]
  cost N [REFRESHES] [RUNS]
  replicas-catchup [BACKLOG] [SITES] [LATENCY_MS] [RUNS]
                                   three replicas on PostgreSQL beside one daemon on
                                   PostgreSQL and one on SQLite (default 2000 50 50 3)
  replicas-failover [RATE] [WINDOW_SECS] [LATENCY_MS] [RUNS]
                                   SIGKILL, then SIGSTOP, of one of three replicas
                                   amid a stream of due work (default 20 120 1000 3)
  replicas-token N [RUNS] [SECS]   one replica's token path alone, beside two more, and SQLite
  replicas-serve N [RUNS] [IDLE_SECS]
                                   READY, RSS and idle CPU per replica (two replicas)
env: ACUTOKEN_BIN (default target/release/acutoken), BENCH_DIR (default target/bench),
     OHA, NGINX, SERVE_METRICS=1 (serve with the metrics listener on),
     PYTHON (default python3, runs benches/cron_refresh.py),
     ACUTOKEN_TEST_PG, ACUTOKEN_TEST_PG_ADMIN, ACUTOKEN_TEST_PG_PASSWORD_FILE (replicas-*),
     BASELINE_BIN (replicas-*: also one daemon on PostgreSQL run by this build)";

/// Milliseconds of `d`, as figures are reported.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One run's named figures.
type Figures = Vec<(String, f64)>;

/// Collected figures: one row per run, medians at the end.
#[derive(Default)]
pub struct Report {
    rows: BTreeMap<(String, usize), Vec<Figures>>,
    /// Lines printed after the medians (comparisons drawn from them).
    notes: Vec<String>,
}

impl Report {
    /// Records and prints one run's figures.
    pub fn row(&mut self, bench: &str, n: usize, run: usize, fields: &[(&str, f64)]) {
        let mut obj = serde_json::Map::new();
        obj.insert("bench".into(), bench.into());
        obj.insert("n".into(), n.into());
        obj.insert("run".into(), run.into());
        for (k, v) in fields {
            obj.insert((*k).into(), round(*v).into());
        }
        let line = serde_json::Value::Object(obj).to_string();
        println!("{line}");
        let path = fixture::work_root().join("results.jsonl");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
        self.rows
            .entry((bench.to_string(), n))
            .or_default()
            .push(fields.iter().map(|(k, v)| (k.to_string(), *v)).collect());
    }

    /// The median of figure `field` of `bench` at `n` over its runs so far.
    pub fn median(&self, bench: &str, n: usize, field: &str) -> Option<f64> {
        let runs = self.rows.get(&(bench.to_string(), n))?;
        let mut v: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.iter().find(|(k, _)| k == field).map(|x| x.1))
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        })
    }

    /// A line to print after the medians.
    pub fn note(&mut self, line: String) {
        self.notes.push(line);
    }

    /// Prints the median of every figure over the runs, then the notes.
    pub fn medians(&self) {
        for ((bench, n), runs) in &self.rows {
            let Some(first) = runs.first() else { continue };
            let mut parts = Vec::new();
            for (i, (k, _)) in first.iter().enumerate() {
                let mut v: Vec<f64> = runs.iter().filter_map(|r| r.get(i)).map(|x| x.1).collect();
                v.sort_by(f64::total_cmp);
                let m = if v.len() % 2 == 1 {
                    v[v.len() / 2]
                } else {
                    (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
                };
                parts.push(format!("{k}={}", round(m)));
            }
            println!(
                "median {bench} n={n} runs={}: {}",
                runs.len(),
                parts.join(" ")
            );
        }
        for line in &self.notes {
            println!("{line}");
        }
    }
}

fn round(v: f64) -> f64 {
    if v.abs() >= 100.0 {
        (v * 10.0).round() / 10.0
    } else {
        (v * 1000.0).round() / 1000.0
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> anyhow::Result<T> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s
            .replace('_', "")
            .parse()
            .map_err(|_| anyhow::anyhow!("`{s}` is not a number\n{USAGE}")),
    }
}

/// Writes an import file of `n` records like those `serve` benchmarks use.
fn gen_import(n: usize, file: &str) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let f = std::fs::File::create(file).with_context(|| format!("cannot create {file}"))?;
    let mut w = std::io::BufWriter::new(f);
    w.write_all(b"[\n")?;
    for i in 0..n {
        let s = fixture::idle_spec(i, n, now);
        let rec = serde_json::json!({
            "name": s.name,
            "instance": format!("https://{}", s.instance),
            "client_id": s.client_id,
            "client_secret": s.client_secret,
            "refresh_token": s.refresh_token,
            "grant_issued_at": acutoken::model::fmt_time(s.grant_issued_at),
            "labels": { "customer": format!("Customer {}", i / 3) },
        });
        serde_json::to_writer(&mut w, &rec)?;
        w.write_all(if i + 1 < n { b",\n" } else { b"\n" })?;
    }
    w.write_all(b"]\n")?;
    w.flush()?;
    // It holds secrets, as a real import file does; import warns otherwise.
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the commands take none of their own.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(cmd) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    std::fs::create_dir_all(fixture::work_root())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut report = Report::default();
    match cmd.as_str() {
        "gen" => {
            let n = arg(&args, 1, 10_000usize)?;
            let file = args.get(2).context(USAGE)?;
            gen_import(n, file)?;
        }
        "serve" => {
            let n = arg(&args, 1, 10_000usize)?;
            let runs = arg(&args, 2, 3usize)?;
            let idle = Duration::from_secs(arg(&args, 3, 60u64)?);
            daemon::serve(n, runs, idle, &mut report)?;
        }
        "token" => {
            let n = arg(&args, 1, 10_000usize)?;
            let runs = arg(&args, 2, 3usize)?;
            let secs = arg(&args, 3, 10u64)?;
            load::token(n, runs, secs, &mut report)?;
        }
        "catchup" => {
            let backlog = arg(&args, 1, 10_000usize)?;
            let sites = arg(&args, 2, 500usize)?;
            let latency = Duration::from_millis(arg(&args, 3, 50u64)?);
            let runs = arg(&args, 4, 3usize)?;
            renewal::catchup(&rt, backlog, sites, latency, runs, &mut report)?;
        }
        "catchup64" => {
            let backlog = arg(&args, 1, 2_000usize)?;
            let sites = arg(&args, 2, 100usize)?;
            let latency = Duration::from_millis(arg(&args, 3, 50u64)?);
            let runs = arg(&args, 4, 3usize)?;
            let limits = cron::Limits {
                global: arg(&args, 5, 64usize)?,
                per_instance: arg(&args, 6, 2usize)?,
            };
            cron::catchup_beside_cron(&rt, backlog, sites, latency, runs, limits, &mut report)?;
        }
        "lateness" => {
            let n = arg(&args, 1, 100_000usize)?;
            let due = arg(&args, 2, 1_000usize)?;
            let window = Duration::from_secs(arg(&args, 3, 60u64)?);
            let runs = arg(&args, 4, 3usize)?;
            renewal::lateness(&rt, n, due, window, runs, &mut report)?;
        }
        "cost" => {
            let n = arg(&args, 1, 10_000usize)?;
            let count = arg(&args, 2, 2_000usize)?;
            let runs = arg(&args, 3, 3usize)?;
            renewal::cost(&rt, n, count, runs, &mut report)?;
        }
        "replicas-catchup" => {
            let backlog = arg(&args, 1, 2_000usize)?;
            let sites = arg(&args, 2, 50usize)?;
            let latency = Duration::from_millis(arg(&args, 3, 50u64)?);
            let runs = arg(&args, 4, 3usize)?;
            replicas::catchup(&rt, backlog, sites, latency, runs, &mut report)?;
        }
        "replicas-failover" => {
            let rate = arg(&args, 1, 20usize)?;
            let window = Duration::from_secs(arg(&args, 2, 120u64)?);
            let latency = Duration::from_millis(arg(&args, 3, 1_000u64)?);
            let runs = arg(&args, 4, 3usize)?;
            replicas::failover(&rt, rate, window, latency, runs, &mut report)?;
        }
        "replicas-token" => {
            let n = arg(&args, 1, 10_000usize)?;
            let runs = arg(&args, 2, 3usize)?;
            let secs = arg(&args, 3, 10u64)?;
            replicas::token(n, runs, secs, &mut report)?;
        }
        "replicas-serve" => {
            let n = arg(&args, 1, 100_000usize)?;
            let runs = arg(&args, 2, 3usize)?;
            let idle = Duration::from_secs(arg(&args, 3, 60u64)?);
            replicas::serve(n, runs, idle, &mut report)?;
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
    report.medians();
    Ok(())
}
