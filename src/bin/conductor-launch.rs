//! `conductor-launch __launch-child PARENT_PID PROGRAM ARGS...`: the launcher conductor starts
//! its stdio children through (see `downstream::run_launcher`). The same thing conductor's own
//! executable does with those arguments, in a binary small enough to start in a fraction of
//! the time: conductor is large, and a server list of twenty pays for the launcher twenty times.

use std::process::ExitCode;

fn main() -> ExitCode {
    use mcp_conductor::downstream;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1) {
        Some(first) if first == downstream::LAUNCHER_ARG => downstream::run_launcher(&args[2..]),
        _ => {
            eprintln!(
                "conductor-launch is started by conductor: {} {} PARENT_PID PROGRAM [ARGS...]",
                env!("CARGO_BIN_NAME"),
                downstream::LAUNCHER_ARG
            );
            ExitCode::from(2)
        }
    }
}
