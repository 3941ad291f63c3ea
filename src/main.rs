//! The `acutoken` binary: parse arguments, run the command, print one `error:` line on failure.
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(acutoken::cli::main());
}
