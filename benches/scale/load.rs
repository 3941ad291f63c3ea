//! Measurement 5: the token path under a real load generator (`oha` over the
//! Unix socket), beside nginx answering a body of the same size on a Unix
//! socket as the practical ceiling of this machine.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use acutoken::secret::Secret;
use acutoken::store::connections::{self, SecretColumn};

use crate::daemon::settle;
use crate::fixture::{Daemon, Dir, Notify, idle_store, name};
use crate::{Report, ms};

/// Concurrent clients measured.
pub const CLIENTS: [usize; 3] = [1, 8, 64];

/// What oha reported for one load.
pub struct Load {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub ok: u64,
    pub other: u64,
}

fn oha() -> String {
    std::env::var("OHA").unwrap_or_else(|_| "oha".into())
}

fn nginx() -> String {
    std::env::var("NGINX").unwrap_or_else(|_| "nginx".into())
}

/// Runs oha for `secs` against `url` on the Unix socket `sock`.
pub fn run_oha(sock: &Path, url: &str, clients: usize, secs: u64) -> anyhow::Result<Load> {
    let out = Command::new(oha())
        .args(["--no-tui", "--output-format", "json", "-z"])
        .arg(format!("{secs}s"))
        .arg("-c")
        .arg(clients.to_string())
        .arg("--unix-socket")
        .arg(sock)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} (cargo install oha)", oha()))?;
    if !out.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha's JSON")?;
    let secs_of = |p: &str| {
        v["latencyPercentiles"][p]
            .as_f64()
            .map(Duration::from_secs_f64)
            .unwrap_or_default()
    };
    let mut ok = 0;
    let mut other = 0;
    if let Some(m) = v["statusCodeDistribution"].as_object() {
        for (code, n) in m {
            let n = n.as_u64().unwrap_or(0);
            if code == "200" {
                ok += n;
            } else {
                other += n;
            }
        }
    }
    Ok(Load {
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50: secs_of("p50"),
        p99: secs_of("p99"),
        ok,
        other,
    })
}

/// One HTTP/1.1 GET over a Unix socket: status and body.
pub fn get(sock: &Path, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => buf[i + 4..].to_vec(),
        None => Vec::new(),
    };
    Ok((status, body))
}

/// Gives connection `who` a valid access token, as a refresh would have saved it.
pub fn give_access_token(dir: &Dir, who: &str) -> anyhow::Result<()> {
    let mut st = dir.open_store()?;
    let now = chrono::Utc::now();
    st.write(|tx, kr| {
        let mut row = connections::get_tx(tx, who)?;
        row.conn.access_expires_at = Some(now + chrono::Duration::hours(1));
        row.access_lifetime = Some(Duration::from_secs(3600));
        row.token_type = Some("Bearer".into());
        connections::put(tx, &row)?;
        let token = Secret::new(format!("{:064x}", 0x5eed_u128 * 0x9E37_79B9_7F4A_7C15));
        connections::set_secret(tx, kr, row.conn.id, SecretColumn::AccessToken, Some(&token))
    })?;
    Ok(())
}

fn record(report: &mut Report, what: &str, n: usize, run: usize, c: usize, l: &Load) {
    report.row(
        &format!("{what}/c{c}"),
        n,
        run,
        &[
            ("rps", l.rps),
            ("p50_ms", ms(l.p50)),
            ("p99_ms", ms(l.p99)),
            ("ok", l.ok as f64),
            ("not_ok", l.other as f64),
        ],
    );
}

/// The token path against acutoken, then the same load against nginx.
pub fn token(n: usize, runs: usize, secs: u64, report: &mut Report) -> anyhow::Result<()> {
    let seed = idle_store(n)?;
    let dir = Dir::fresh(&format!("token-{n}"))?;
    dir.copy_store_from(&seed)?;
    dir.write_config("", "")?;
    let who = name(n / 2);
    give_access_token(&dir, &who)?;
    let notify = Notify::bind(&dir)?;
    let d = Daemon::start(&dir, &notify)?;
    notify.wait_for("READY=1", Duration::from_secs(600))?;
    settle(&d, Duration::from_secs(120))?;
    let path = format!("/v1/connections/{who}/token");
    let (status, body) = get(&dir.socket(), &path)?;
    if status != 200 {
        bail!(
            "the token request answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let url = format!("http://localhost{path}");
    let cpu0 = d.cpu()?;
    let t0 = Instant::now();
    for run in 0..runs {
        for c in CLIENTS {
            let l = run_oha(&dir.socket(), &url, c, secs)?;
            record(report, "token", n, run, c, &l);
        }
    }
    let busy = (d.cpu()? - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let (rss, _) = d.rss_kib()?;
    report.row(
        "token/daemon",
        n,
        0,
        &[("cpu_cores_busy", busy), ("rss_mib", rss as f64 / 1024.0)],
    );
    d.stop()?;

    let mut ng = Nginx::start(&dir, &body)?;
    for run in 0..runs {
        for c in CLIENTS {
            let l = run_oha(&ng.socket, &url, c, secs)?;
            record(report, "nginx", n, run, c, &l);
        }
    }
    ng.stop();
    Ok(())
}

/// nginx answering `body` to every request on a Unix socket.
struct Nginx {
    child: Child,
    socket: std::path::PathBuf,
}

impl Nginx {
    fn start(dir: &Dir, body: &[u8]) -> anyhow::Result<Nginx> {
        let root = dir.path.join("nginx");
        std::fs::create_dir_all(root.join("tmp"))?;
        let socket = root.join("nginx.sock");
        let _ = std::fs::remove_file(&socket);
        let conf = format!(
            r#"daemon off;
worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    server {{
        listen unix:{sock};
        location / {{
            default_type application/json;
            add_header Cache-Control no-store;
            return 200 '{body}';
        }}
    }}
}}
"#,
            root = root.display(),
            sock = socket.display(),
            // A JSON body holds no single quote; served from memory, as acutoken's is.
            body = String::from_utf8_lossy(body).replace('\'', ""),
        );
        let conf_path = root.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(nginx())
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {} (apt-get install nginx-light)", nginx()))?;
        let end = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > end {
                bail!("nginx did not listen on {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nginx { child, socket })
    }

    /// SIGTERM is nginx's fast shutdown: the master stops its workers first.
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = self.child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
