//! The `text` log under systemd (issue 15): when stderr is the journal's
//! stream (`JOURNAL_STREAM` names its device and inode), each line carries
//! the sd-daemon priority prefix and no timestamp of ours, so journald files
//! warnings and errors at their priority; anywhere else the lines keep their
//! timestamps and carry no prefix.

mod support_daemon;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::MetadataExt as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support_daemon::{Rig, SITE, eventually};

/// `serve` with stderr on a fresh pipe and `JOURNAL_STREAM` made from that
/// pipe's device and inode (`ino_offset` 0: the real ones, as systemd sets
/// them). Returns the child (killed on drop) and what it has written to
/// stderr so far.
fn serve_on_pipe(rig: &Rig, ino_offset: u64) -> (tokio::process::Child, Arc<Mutex<String>>) {
    let (reader, writer) = std::io::pipe().unwrap();
    let meta = std::fs::File::from(std::os::fd::OwnedFd::from(writer.try_clone().unwrap()))
        .metadata()
        .unwrap();
    let journal_stream = format!("{}:{}", meta.dev(), meta.ino() + ino_offset);

    let child = rig
        .command()
        .env("JOURNAL_STREAM", journal_stream)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(writer)
        .spawn()
        .unwrap();

    let seen = Arc::new(Mutex::new(String::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    (child, seen)
}

fn line_with(seen: &Mutex<String>, needle: &str) -> Option<String> {
    seen.lock()
        .unwrap()
        .lines()
        .find(|l| l.contains(needle))
        .map(str::to_string)
}

/// The first word after the prefix is the level, or `error:` / `warning:`
/// on lines written outside the logger: nothing (no timestamp) comes before.
fn starts_with_level(s: &str) -> bool {
    [
        "ERROR",
        "WARN",
        "INFO",
        "DEBUG",
        "TRACE",
        "error: ",
        "warning: ",
    ]
    .iter()
    .any(|l| s.trim_start().starts_with(l))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_journal_stream_lines_carry_their_priority_and_no_timestamp() {
    let rig = Rig::new().await;
    rig.add("acme", SITE, true).await;
    let (child, seen) = serve_on_pipe(&rig, 0);
    let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());

    eventually("serve logs that it is ready", || {
        line_with(&seen, "acutoken is ready").is_some()
    })
    .await;
    // An error: a reload of a config that does not parse is refused.
    std::fs::write(rig.config_path(), "[serve\n").unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    eventually("serve logs the refused reload", || {
        line_with(&seen, "reload refused").is_some()
    })
    .await;
    drop(child);

    let all = seen.lock().unwrap().clone();
    let ready = line_with(&seen, "acutoken is ready").unwrap();
    assert!(ready.starts_with("<6>"), "info is not <6>: {ready}\n{all}");
    // The logger's line and the `error:` line written straight to stderr.
    let refused: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("reload refused"))
        .collect();
    assert_eq!(refused.len(), 2, "{all}");
    for line in refused {
        assert!(line.starts_with("<3>"), "error is not <3>: {line}\n{all}");
    }
    for line in all.lines().filter(|l| !l.is_empty()) {
        let rest = line
            .strip_prefix('<')
            .and_then(|r| r.split_once('>'))
            .filter(|(p, _)| matches!(*p, "3" | "4" | "6" | "7"))
            .map(|(_, rest)| rest);
        let Some(rest) = rest else {
            panic!("a line without a priority prefix: {line}\n{all}");
        };
        assert!(
            starts_with_level(rest),
            "a line with something (a timestamp?) before its level: {line}\n{all}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elsewhere_lines_keep_their_timestamp_and_carry_no_prefix() {
    let rig = Rig::new().await;
    rig.add("acme", SITE, true).await;
    // JOURNAL_STREAM inherited by a process whose stderr was redirected:
    // the device matches, the inode does not.
    let (child, seen) = serve_on_pipe(&rig, 1);
    eventually("serve logs that it is ready", || {
        line_with(&seen, "acutoken is ready").is_some()
    })
    .await;
    drop(child);

    let all = seen.lock().unwrap().clone();
    let ready = line_with(&seen, "acutoken is ready").unwrap();
    assert!(!ready.starts_with('<'), "a prefix off the journal: {ready}");
    // RFC 3339: 2026-12-07T15:04:05...
    let stamp = ready.trim_start().as_bytes();
    assert!(
        stamp.len() > 11 && stamp[..4].iter().all(u8::is_ascii_digit) && stamp[10] == b'T',
        "no timestamp off the journal: {ready}\n{all}"
    );
}
