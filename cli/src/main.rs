//! `kubectl-cplink`: run as `kubectl cplink ...` once on the PATH.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = cplink_cli::args::Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cplink_cli::run(&args)) {
        Ok(outcome) => {
            print!("{}", outcome.text);
            if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
