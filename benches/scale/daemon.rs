//! Measurements 2 to 4: start to `READY=1`, resident memory, idle CPU, and
//! SIGHUP reload with nothing changed and with 1 % of the connections changed.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use acutoken::store::connections;

use crate::fixture::{Daemon, Dir, Notify, idle_store, name};
use crate::{Report, ms};

/// How long start-up may take before the run is called failed.
const START_LIMIT: Duration = Duration::from_secs(600);

/// One `serve` run on a copy of the seeded store of `n` connections.
pub fn serve(n: usize, runs: usize, idle: Duration, report: &mut Report) -> anyhow::Result<()> {
    let seed = idle_store(n)?;
    for run in 0..runs {
        let dir = Dir::fresh(&format!("serve-{n}"))?;
        dir.copy_store_from(&seed)?;
        // SERVE_METRICS=1: with the Prometheus listener, whose gauges are
        // kept up to date in the background.
        let (bench, metrics) = if std::env::var_os("SERVE_METRICS").is_some_and(|v| v == "1") {
            ("serve+metrics", "[metrics]\nlisten = \"127.0.0.1:0\"\n")
        } else {
            ("serve", "")
        };
        dir.write_config("", metrics)?;
        let notify = Notify::bind(&dir)?;
        let d = Daemon::start(&dir, &notify)?;
        let ready = notify.wait_for("READY=1", START_LIMIT)?;
        let to_ready = ready - d.started;
        let cpu_start = d.cpu()?;
        let (_, peak_start) = d.rss_kib()?;
        // Settled: background start-up work (alert pass, first metrics
        // gathering) is over once the CPU stays still for two seconds.
        let settled = settle(&d, Duration::from_secs(120))?;
        let (rss, peak) = d.rss_kib()?;
        let cpu0 = d.cpu()?;
        let t0 = Instant::now();
        std::thread::sleep(idle);
        let idle_cpu = d.cpu()? - cpu0;
        let idle_wall = t0.elapsed();

        // Reload with nothing changed.
        let h = Instant::now();
        d.signal(Signal::SIGHUP)?;
        notify.wait_for("READY=1", Duration::from_secs(60))?;
        let reload_same = h.elapsed();

        // 1 % of the connections changed (a label, as `connection set` would
        // write it), then a reload; and how long the daemon takes to take in
        // the change (its CPU settles again).
        let changed = (n / 100).max(1);
        let mut st = dir.open_store()?;
        let w = Instant::now();
        st.write(|tx, _| {
            for i in (0..n).step_by(n / changed).take(changed) {
                let mut row = connections::get_tx(tx, &name(i))?;
                row.conn
                    .labels
                    .insert("plan".into(), format!("changed-{run}"));
                connections::put(tx, &row)?;
            }
            Ok(())
        })?;
        let write_1pct = w.elapsed();
        drop(st);
        let h = Instant::now();
        d.signal(Signal::SIGHUP)?;
        notify.wait_for("READY=1", Duration::from_secs(60))?;
        let reload_changed = h.elapsed();
        let absorbed = settle(&d, Duration::from_secs(120))?;
        let (rss_after, _) = d.rss_kib()?;
        d.stop()?;

        report.row(
            bench,
            n,
            run,
            &[
                ("ready_ms", ms(to_ready)),
                ("rss_mib", rss as f64 / 1024.0),
                ("peak_rss_mib", peak.max(peak_start) as f64 / 1024.0),
                ("settle_ms", ms(settled)),
                ("startup_cpu_ms", ms(cpu_start)),
                (
                    "idle_cpu_pct",
                    idle_cpu.as_secs_f64() / idle_wall.as_secs_f64() * 100.0,
                ),
                ("idle_cpu_ms", ms(idle_cpu)),
                ("reload_ms", ms(reload_same)),
                ("write_1pct_ms", ms(write_1pct)),
                ("reload_1pct_ms", ms(reload_changed)),
                ("absorb_1pct_ms", ms(absorbed)),
                ("rss_after_mib", rss_after as f64 / 1024.0),
            ],
        );
    }
    Ok(())
}

/// Waits until the daemon's CPU time stays unchanged for two seconds; how
/// long that took (`limit` when it never did: the figure says so).
pub fn settle(d: &Daemon, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last = d.cpu()?;
    let mut still_since = Instant::now();
    while start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(100));
        let now = d.cpu()?;
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= Duration::from_secs(2) {
            return Ok(still_since - start);
        }
    }
    eprintln!("note: the daemon kept using CPU for {limit:?}");
    Ok(limit)
}
