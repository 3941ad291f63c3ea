//! Terminal input and output helpers: secrets from stdin or files, confirmation, tables.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::Path;

use anyhow::Context as _;

use crate::secret::Secret;

/// Largest secret accepted from a file or stdin; anything bigger is a mistake.
const MAX_SECRET: u64 = 64 * 1024;

/// Reads a secret from `file`, or from stdin (prompted without echo on a terminal).
/// One trailing newline is trimmed; an empty value is refused.
pub fn read_secret(file: Option<&Path>, what: &str, flag: &str) -> anyhow::Result<Secret> {
    let text = match file {
        Some(p) => {
            let f = std::fs::File::open(p)
                .with_context(|| format!("cannot read {what} from {}", p.display()))?;
            let mut s = String::new();
            f.take(MAX_SECRET + 1)
                .read_to_string(&mut s)
                .with_context(|| format!("{} does not hold text", p.display()))?;
            s
        }
        None if std::io::stdin().is_terminal() => {
            rpassword::prompt_password(format!("{what} (input hidden): "))
                .with_context(|| format!("cannot read {what} from the terminal"))?
        }
        None => {
            let mut s = String::new();
            std::io::stdin()
                .take(MAX_SECRET + 1)
                .read_to_string(&mut s)
                .with_context(|| format!("cannot read {what} from stdin"))?;
            s
        }
    };
    // Reading one byte past the limit tells a huge input from one that fits,
    // so it is refused instead of silently stored cut short.
    if text.len() as u64 > MAX_SECRET {
        anyhow::bail!(
            "{what} is longer than {} KiB: give the value alone",
            MAX_SECRET / 1024
        );
    }
    let trimmed = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if trimmed.trim().is_empty() {
        anyhow::bail!("{what} is empty: pipe it on stdin or name a file with {flag}");
    }
    if trimmed.contains('\n') {
        anyhow::bail!("{what} spans several lines: give exactly one line");
    }
    Ok(Secret::new(trimmed))
}

/// Asks a yes/no question on the terminal; false when stdin is not one.
pub fn confirm(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        return false;
    }
    matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes")
}

/// Prints rows as aligned columns; the first row is the header.
pub fn print_table(rows: &[Vec<String>]) {
    let Some(first) = rows.first() else { return };
    let mut widths = vec![0usize; first.len()];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// `-` for a missing value.
pub fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}
