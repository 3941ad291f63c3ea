//! Writes acutoken's shell completions (bash, zsh, fish) and man page into a
//! directory, for packaging: `acutoken-assets DIR` (`.ci/package` runs it
//! before `cargo deb`). A binary apart from the daemon's: the generators
//! would add their weight to every install for a step only the package
//! build takes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory as _;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!(
            "error: usage: acutoken-assets DIR (the directory to write the completions and acutoken.1 into)"
        );
        return ExitCode::from(2);
    };
    match write(PathBuf::from(dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write(dir: PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = acutoken::cli::Cli::command();
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, "acutoken", &dir)
            .with_context(|| format!("cannot write completions into {}", dir.display()))?;
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut page)
        .context("cannot render the man page")?;
    let man = dir.join("acutoken.1");
    std::fs::write(&man, page).with_context(|| format!("cannot write {}", man.display()))?;
    println!("wrote completions and acutoken.1 into {}", dir.display());
    Ok(())
}
