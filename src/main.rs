//! The `tfa-rotator` binary: parse the command line, run, turn the result into an exit code.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    // The guard an exec sink runs its hook under (`sinks::exec`): before anything else, so
    // it sets up nothing it would hand to the hook.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == tfa_rotator::sinks::exec::GUARD)
    {
        let code = tfa_rotator::sinks::exec::guard_main(&args[2..]);
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = tfa_rotator::cli::Cli::parse();
    std::process::ExitCode::from(tfa_rotator::commands::main(cli))
}
