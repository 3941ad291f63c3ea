//! The daemon's listeners: the API on its Unix socket and, when configured,
//! on TCP (with TLS when certificate files are set, which a non-loopback
//! address requires); the authorization callback; the metrics endpoint.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use super::tasks::{Common, Tasks};
use crate::config::Config;
use crate::daemon::api::{self, Api};
use crate::daemon::metrics::Metrics;
use crate::daemon::tls::{Certificate, Tls};
use crate::daemon::{callback, listen};
use crate::renewal::engine::Engine;

/// Binds every configured listener and serves each on its own task until
/// shutdown; a listener that cannot bind stops the start with an error
/// naming its setting. `tls` is the certificate of `api.listen`, when it has
/// one. Returns the API socket's path (removed at stop).
#[allow(clippy::too_many_arguments)]
pub(super) async fn spawn_listeners(
    tasks: &mut Tasks,
    config: &Config,
    tls: Option<&Arc<Certificate>>,
    api: &Api,
    engine: &Arc<Engine>,
    metrics: &Metrics,
    ready: &Arc<crate::daemon::api::Readiness>,
    common: &Common,
) -> anyhow::Result<PathBuf> {
    let Common { shutdown, wake, .. } = common;
    // Every listener is served with the same bounds (see `listen`).
    let api_limits =
        listen::Limits::with_request_timeout(listen::request_timeout(config.renewal.http_timeout));
    let socket = config.socket_path();
    let listener = bind_socket(&socket, config.api.socket_group.as_deref())?;
    {
        let router = api::router(api.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(listen::serve(
            "api.socket",
            listener,
            listen::Plain,
            router,
            api_limits,
            shutdown,
        ));
    }
    if let Some(addr) = config.api.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on api.listen {addr}"))?;
        let router = api::tcp_router(api.clone());
        let shutdown = shutdown.clone();
        let name = "api.listen";
        if let Some(cert) = tls {
            let tls = Tls::new(cert.clone())?;
            tracing::info!(%addr, "API listening with TLS");
            tasks.spawn(listen::serve(name, l, tls, router, api_limits, shutdown));
        } else {
            // Validation allows this on a loopback address only.
            tracing::info!(%addr, "API listening without TLS (loopback)");
            tasks.spawn(listen::serve(
                name,
                l,
                listen::Plain,
                router,
                api_limits,
                shutdown,
            ));
        }
    }
    if let Some(addr) = config.callback.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on callback.listen {addr}"))?;
        let router = callback::router(engine.clone(), wake.clone(), &config.callback_path());
        let shutdown = shutdown.clone();
        tracing::info!(%addr, path = %config.callback_path(), "authorization callback listening");
        tasks.spawn(listen::serve(
            "callback.listen",
            l,
            listen::Plain,
            router,
            api_limits,
            shutdown,
        ));
    }
    if let Some(addr) = config.metrics.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on metrics.listen {addr}"))?;
        let router = metrics.router(ready.clone());
        let shutdown = shutdown.clone();
        let limits = listen::Limits::with_request_timeout(listen::METRICS_REQUEST_TIMEOUT);
        tasks.spawn(listen::serve(
            "metrics.listen",
            l,
            listen::Plain,
            router,
            limits,
            shutdown,
        ));
    }
    Ok(socket)
}

fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    // We hold the store lock, so a socket file left here belongs to a dead daemon.
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on api.socket {}", path.display()))?;
    let mode = if let Some(g) = group {
        let grp = nix::unistd::Group::from_name(g)
            .ok()
            .flatten()
            .ok_or_else(|| {
                anyhow::anyhow!("api.socket_group `{g}` is not a group on this system")
            })?;
        nix::unistd::chown(path, None, Some(grp.gid))
            .with_context(|| format!("cannot give {} to group {g}", path.display()))?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}
