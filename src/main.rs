//! The `tfa-rotator` binary: parse the command line, run, turn the result into an exit code.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tfa_rotator::cli::Cli::parse();
    std::process::ExitCode::from(tfa_rotator::commands::main(cli))
}
