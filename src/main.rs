//! The `conductor` command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    use mcp_conductor::downstream;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|arg| arg == downstream::LAUNCHER_ARG)
    {
        return downstream::run_launcher(&args[2..]);
    }
    // Children are started through a launcher, so they die with conductor: the small one
    // installed beside this executable, else this executable itself.
    if let Ok(executable) = std::env::current_exe() {
        let small =
            executable.with_file_name(format!("conductor-launch{}", std::env::consts::EXE_SUFFIX));
        downstream::use_launcher(if small.is_file() { small } else { executable });
    }
    let cli = mcp_conductor::cli::Cli::parse_from(args);
    let runtime = match cli.threads() {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        threads => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
