//! The `keel` binary: runs a node (`keel run`), the demo (`keel demo`), and the CLI that checks
//! configs. Argument parsing and the tracing subscriber live here and nowhere else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel_node::config::{self, ConfigError};
use keel_node::daemon::{self, Daemon};
use keel_node::demo;
use tracing_subscriber::EnvFilter;

/// keel: a highly-available HTTP load balancer.
#[derive(Parser)]
#[command(name = "keel", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node from a config file.
    Run {
        /// The node's TOML config.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run three demo backends behind a balancer on loopback.
    Demo {
        /// Address the balancer listens on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address of the admin API.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
    /// Work with config files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate config files; prints FILE:LINE: KEY: REASON for each problem.
    Check {
        /// Files to check.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Config { command: ConfigCommand::Check { files } } => check(&files),
        Command::Run { config } => match config::load(&config) {
            Ok(file) => {
                let workers = file.node.workers;
                serve(workers, async move { Ok(file) }, None)
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo { listen, admin } => serve(
            0,
            async move {
                let (file, text) = demo::prepare(listen, admin).await?;
                println!("Demo config (what `keel run --config` would read):\n\n{text}");
                Ok(file)
            },
            Some(demo::banner(listen, admin)),
        ),
    }
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for path in files {
        match config::load(path) {
            Ok(_) => println!("{}: ok", path.display()),
            Err(e @ (ConfigError::Read { .. } | ConfigError::Invalid { .. })) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Builds the runtime, prepares the node with `prepare`, and serves until SIGTERM/SIGINT.
fn serve(
    workers: usize,
    prepare: impl std::future::Future<Output = anyhow::Result<config::NodeFile>>,
    banner: Option<String>,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("keel-worker");
    if workers > 0 {
        builder.worker_threads(workers);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let file = match prepare.await {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{e:#}");
                return ExitCode::FAILURE;
            }
        };
        let daemon = match Daemon::bind(file).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(banner) = banner {
            println!("{banner}");
        }
        daemon.run(daemon::termination_signal()).await;
        ExitCode::SUCCESS
    })
}
