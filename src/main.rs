//! The `kiln` binary. See `kiln --help`; the commands are in `src/cli/`, one file per family.

mod cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    cli::main().await
}
