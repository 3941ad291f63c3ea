//! Log lines carry no ANSI colour codes when stderr is not a terminal
//! (issue 12, item 16): a pipe, a file or journald's capture of stderr would
//! otherwise store the escape codes verbatim.

mod support_daemon;

use std::process::Stdio;

use support_daemon::{Rig, SITE, WAIT};
use tokio::io::AsyncBufReadExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_to_a_pipe_without_escape_codes() {
    let rig = Rig::new().await;
    rig.add("acme", SITE, true).await;

    let mut c = rig.command();
    // A terminal type that supports colour and no NO_COLOR: only the pipe
    // itself may turn colour off.
    c.env_remove("NO_COLOR")
        .env("TERM", "xterm-256color")
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();

    let mut seen = String::new();
    let read = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("acutoken is ready") {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.start_kill();
    assert!(
        matches!(read, Ok(true)),
        "serve never logged that it is ready; its stderr:\n{seen}"
    );
    assert!(
        !seen.contains('\u{1b}'),
        "the log on a pipe carries escape codes:\n{}",
        seen.escape_debug()
    );
}
