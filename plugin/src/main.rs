use clap::Parser;
use portcullis_plugin::cli::Cli;
use portcullis_plugin::commands::{Exit, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(Exit::Ok) => std::process::ExitCode::SUCCESS,
        Ok(Exit::Refused) => std::process::ExitCode::from(3),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
