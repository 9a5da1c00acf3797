//! The `kiln` binary: parse the command line, run the command, exit non-zero
//! with the error chain on failure.

use std::process::ExitCode;

fn main() -> ExitCode {
    match kiln_server::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
