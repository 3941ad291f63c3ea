//! The terminal rendering of `status`: aligned, colour only on a TTY.

use std::io::IsTerminal;

use super::print_table;
use crate::status::Status;

/// The terminal rendering: aligned, colour only on a TTY.
pub(super) fn print_human(s: &Status) {
    let color = std::io::stdout().is_terminal();
    let paint = |code: &str, text: &str| {
        if color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    };
    let daemon = if s.daemon.running {
        paint(
            "32",
            &format!(
                "running (pid {}){}",
                s.daemon
                    .pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into()),
                if s.daemon.ready { "" } else { ", starting" }
            ),
        )
    } else {
        paint("31", "not running")
    };
    println!("daemon    {daemon}");
    if s.daemon.unsaved_tokens > 0 {
        println!(
            "          {}",
            paint(
                "31;1",
                &format!(
                    "{} rotated token(s) not yet saved: the store cannot be written",
                    s.daemon.unsaved_tokens
                )
            )
        );
    }
    println!("store     {}", s.store);
    if !s.replicas.is_empty() {
        let live = s.replicas.iter().filter(|r| r.live).count();
        println!("replicas  {live} live of {}", s.replicas.len());
        let mut rows = vec![vec![
            "  NAME".to_string(),
            "HOST".into(),
            "PID".into(),
            "HEARTBEAT".into(),
            "CLAIMS".into(),
            "DUTIES".into(),
        ]];
        for r in &s.replicas {
            rows.push(vec![
                format!("  {}", r.name),
                r.host.clone(),
                r.pid.to_string(),
                if r.live {
                    r.heartbeat_at.clone()
                } else {
                    paint("31", &format!("{} (lapsed)", r.heartbeat_at))
                },
                r.claims.to_string(),
                if r.alerts {
                    "alerts".into()
                } else {
                    "-".into()
                },
            ]);
        }
        print_table(&rows);
    }
    let counts: Vec<String> = s
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "total     {} ({})",
        s.total,
        if counts.is_empty() {
            "none".into()
        } else {
            counts.join(", ")
        }
    );
    if s.needs_action_total > 0 {
        println!();
        println!(
            "{}",
            paint(
                "33;1",
                &format!("needs a human ({}):", s.needs_action_total)
            )
        );
        let mut rows = vec![vec![
            "NAME".to_string(),
            "STATE".into(),
            "DEADLINE".into(),
            "ACTION".into(),
        ]];
        for a in &s.needs_action {
            rows.push(vec![
                a.name.clone(),
                a.state.to_string(),
                a.deadline.clone().unwrap_or_else(|| "-".into()),
                a.action.clone(),
            ]);
        }
        print_table(&rows);
        if s.needs_action_total as usize > s.needs_action.len() {
            println!(
                "... and {} more (`acutoken connection list`)",
                s.needs_action_total as usize - s.needs_action.len()
            );
        }
    }
    if !s.set_aside.is_empty() {
        println!();
        println!(
            "{}",
            paint("31;1", &format!("set aside ({}):", s.set_aside.len()))
        );
        for a in &s.set_aside {
            println!("  {} (since {}): {}", a.name, a.since, a.reason);
            println!("    action: {}", a.action);
        }
    }
    if !s.nearest_deadlines.is_empty() {
        println!();
        println!("nearest deadlines:");
        let mut rows = vec![vec![
            "NAME".to_string(),
            "STATE".into(),
            "DEADLINE".into(),
            "NEXT REFRESH".into(),
        ]];
        for d in s.nearest_deadlines.iter().take(5) {
            rows.push(vec![
                d.name.clone(),
                d.state.to_string(),
                format!(
                    "{} ({})",
                    d.deadline,
                    d.deadline_source.clone().unwrap_or_default()
                ),
                d.next_refresh_at.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        print_table(&rows);
    }
    println!();
    if s.alerts.undelivered > 0 {
        println!(
            "alerts    {}",
            paint("33", &format!("{} undelivered", s.alerts.undelivered))
        );
    } else {
        println!("alerts    all delivered");
    }
    for c in &s.alerts.channels {
        let name = c.get("name").and_then(|v| v.as_str()).unwrap_or("?");
        let err = c.get("last_error").and_then(|v| v.as_str());
        if let Some(e) = err {
            println!("          {name}: {}", paint("31", e));
        }
    }
}
