//! The `keel` binary: runs a node (`keel run`), the demo (`keel demo`), and the CLI that checks
//! configs, talks to a running node (`keel status`, `keel backend …`, `keel cluster …`, `keel
//! config …`) and prints shell completions (`keel completion bash|zsh|fish`). Argument parsing
//! and the tracing subscriber live here and nowhere else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel_cluster::api::AddNode;
use keel_node::cli;
use keel_node::config::{self, ConfigError};
use keel_node::daemon::{self, Daemon};
use keel_node::demo;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc malloc, for memory more than for speed. glibc never gave back the
/// heap grown by a burst of connections: after 3,000 idle keep-alive connections had come and
/// gone, keel stayed at 84 MiB (and at ~250 MiB after 10,000, for the rest of the process);
/// with mimalloc it is back to ~20 MiB as soon as traffic resumes, and an idle connection costs
/// 19 KiB instead of 22.7. On the request path (many small short-lived allocations: header
/// maps, futures, bodies) glibc's malloc/free took ~4.7 % of a keep-alive profile, mimalloc ~3 %.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `keel --version` prints: the version and the commit it was built from ("unknown"
/// outside a git checkout; see build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("KEEL_GIT_COMMIT"), ")");

/// keel — a highly-available load balancer: HTTP/TCP proxy, health checks, sticky sessions,
/// TLS, and a virtual IP moved by Raft.
#[derive(Parser)]
#[command(
    name = "keel",
    version = VERSION,
    about = "keel — a highly-available load balancer: HTTP/TCP proxy, health checks, sticky sessions, TLS, \
             and a virtual IP moved by Raft",
    long_about = "keel — a highly-available load balancer: HTTP/TCP proxy, health checks, sticky sessions, TLS, \
                  and a virtual IP moved by Raft.\n\n\
                  One binary runs a node (`keel run`) and is the CLI that talks to a running node or cluster \
                  through its admin API (--admin, --token).",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How to reach a node's admin API.
#[derive(clap::Args, Clone)]
struct AdminArgs {
    /// Admin API address of any cluster member: IP:PORT, or HOST:PORT (first address).
    #[arg(long, default_value = "127.0.0.1:9090", global = true, value_parser = cli::admin_addr)]
    admin: SocketAddr,
    /// Bearer token of the admin API.
    #[arg(long, env = "KEEL_ADMIN_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
}

impl AdminArgs {
    fn target(&self) -> cli::Target {
        cli::Target { admin: self.admin, token: self.token.clone() }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a node from a config file.
    Run {
        /// The node's TOML config.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Run as a witness: vote and store the Raft log, serve no traffic, never hold the VIP.
        #[arg(long)]
        witness: bool,
    },
    /// Manage cluster membership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Drain, enable or re-weight a backend server.
    Backend {
        #[command(subcommand)]
        command: BackendCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Listeners, pools and servers of a node, with state and counters.
    Status {
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a shell completion script: `keel completion bash > /etc/bash_completion.d/keel`.
    Completion {
        /// The shell to complete for.
        shell: clap_complete::Shell,
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
    /// Work with config files and the live config.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Make this node (from its config file) the first member, seeding the cluster's config.
    Init {
        /// The node's TOML config ([node], [cluster], and the seed listeners/pools).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Join this node (from its config file) to a cluster through any member.
    Join {
        /// Admin address of a current member.
        #[arg(long, value_name = "ADDR")]
        via: SocketAddr,
        /// The joining node's TOML config.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Join as a witness (votes, serves no traffic).
        #[arg(long)]
        witness: bool,
    },
    /// Add a node by id and addresses (run against any member).
    AddNode {
        /// The new node's id.
        id: u64,
        /// Its Raft address.
        raft: SocketAddr,
        /// Its admin address.
        admin_addr: SocketAddr,
        /// Add it as a witness.
        #[arg(long)]
        witness: bool,
    },
    /// Remove a node from the cluster.
    Remove {
        /// The node's id.
        id: u64,
    },
    /// Clear this stopped node's cluster state (its Raft log and the record of a removal) so it
    /// can join again: `keel cluster leave --reset --config FILE`.
    Leave {
        /// Delete the node's Raft state (required: leaving is a reset of a stopped node).
        #[arg(long)]
        reset: bool,
        /// The node's TOML config (names its data dir and admin address).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Hand leadership and the VIP over to another data node without a failover (the leader
    /// keeps serving until the successor holds the VIP; a stop does this by itself).
    Transfer {
        /// The successor's id (default: the most caught-up data voter).
        #[arg(long, value_name = "ID")]
        to: Option<u64>,
    },
    /// The VIPs spread over the nodes (`[vip] addresses`).
    Vip {
        #[command(subcommand)]
        command: VipCommand,
    },
    /// Members, leader, term, log indexes and replication lag.
    Status {
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VipCommand {
    /// Move one VIP to another data node: its holder steps aside (still serving what reaches
    /// it), and the node named takes it once the old holder's lease has ended.
    Move {
        /// The VIP, as listed in `[vip] addresses`.
        address: std::net::IpAddr,
        /// The node to hold it.
        #[arg(long, value_name = "ID")]
        to: u64,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Every pool's servers with their state and weight.
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop sending new requests to a server; in-flight ones finish.
    Drain {
        /// Pool name.
        pool: String,
        /// Server name.
        server: String,
    },
    /// Send requests to a drained server again.
    Enable {
        /// Pool name.
        pool: String,
        /// Server name.
        server: String,
    },
    /// Change a server's weight (1-256).
    Weight {
        /// Pool name.
        pool: String,
        /// Server name.
        server: String,
        /// New weight.
        weight: u32,
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
    /// Validate a config file and make it the cluster's config.
    Apply {
        /// The new config (its [node]/[cluster] sections are ignored).
        file: PathBuf,
    },
    /// Print the live config as TOML.
    Show {
        /// Print it as JSON instead.
        #[arg(long)]
        json: bool,
    },
}

/// What keel logs: `info`, less what libraries repeat per connection or per RPC, which keel
/// reports itself through a throttle (`keel_cluster::throttle`):
/// - rustls: per-connection handshake noise;
/// - h2: a WARN for every client that floods stream resets (rapid reset) or acks a PING never
///   sent — 333 lines for 333 hostile connections; keel logs the connection's protocol error;
/// - openraft's replication: an unreachable peer is retried every 50 ms, and each failed
///   heartbeat or append writes four lines (two WARNs of the engine's replication handler, a
///   WARN and an ERROR of the replication task); keel's Raft network logs the peer going, a
///   reminder every 30 s and its return instead (`keel_cluster::network::client`). The
///   replication task is silenced whole: its other lines are a failed snapshot send (keel's
///   network reports the peer) and a storage error (which also stops openraft's core, and that
///   stays logged: `openraft::core`).
const LOG_DEFAULTS: &str =
    "info,rustls=error,h2=error,openraft::replication=off,openraft::engine::handler::replication_handler=error";

/// The subscriber's filter: [`LOG_DEFAULTS`], then `RUST_LOG`'s directives, which win for the
/// targets they name (`RUST_LOG=debug` raises the default level and keeps the two targets
/// above quiet; `RUST_LOG=openraft::replication=warn` brings openraft's lines back).
fn log_filter(rust_log: Option<&str>) -> EnvFilter {
    let directives = match rust_log.map(str::trim) {
        Some(extra) if !extra.is_empty() => format!("{LOG_DEFAULTS},{extra}"),
        _ => LOG_DEFAULTS.to_owned(),
    };
    EnvFilter::builder().parse_lossy(directives)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(std::env::var("RUST_LOG").ok().as_deref()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Config { command: ConfigCommand::Check { files }, .. } => check(&files),
        Command::Config { command: ConfigCommand::Apply { file }, admin } => {
            operate(async move { cli::config_apply(&admin.target(), &file).await })
        }
        Command::Config { command: ConfigCommand::Show { json }, admin } => {
            operate(async move { cli::config_show(&admin.target(), json).await })
        }
        Command::Status { json, admin } => operate(async move { cli::status(&admin.target(), json).await }),
        Command::Completion { shell } => completion(shell),
        Command::Cluster { command, admin } => operate(async move {
            let target = admin.target();
            match command {
                ClusterCommand::Init { config } => cli::cluster_init(&config, admin.token).await,
                ClusterCommand::Join { via, config, witness } => {
                    cli::cluster_join(via, &config, witness, admin.token).await
                }
                ClusterCommand::AddNode { id, raft, admin_addr, witness } => {
                    cli::cluster_add(&target, AddNode { id, raft_addr: raft, admin_addr, witness }).await
                }
                ClusterCommand::Remove { id } => cli::cluster_remove(&target, id).await,
                ClusterCommand::Transfer { to } => cli::cluster_transfer(&target, to).await,
                ClusterCommand::Vip { command: VipCommand::Move { address, to } } => {
                    cli::cluster_vip_move(&target, address, to).await
                }
                ClusterCommand::Leave { reset, config } => cli::cluster_leave(&config, reset).await,
                ClusterCommand::Status { json } => cli::cluster_status(&target, json).await,
            }
        }),
        Command::Backend { command, admin } => operate(async move {
            let target = admin.target();
            match command {
                BackendCommand::List { json } => cli::backend_list(&target, json).await,
                BackendCommand::Drain { pool, server } => cli::backend(&target, "drain", &pool, &server, None).await,
                BackendCommand::Enable { pool, server } => cli::backend(&target, "enable", &pool, &server, None).await,
                BackendCommand::Weight { pool, server, weight } => {
                    cli::backend(&target, "weight", &pool, &server, Some(weight)).await
                }
            }
        }),
        Command::Run { config, witness } => match config::load_checked(&config) {
            Ok(mut file) => {
                if witness {
                    match file.cluster.as_mut() {
                        Some(c) => c.witness = true,
                        None => {
                            eprintln!("{}: --witness needs a [cluster] section", config.display());
                            return ExitCode::FAILURE;
                        }
                    }
                }
                let workers = file.node.workers;
                serve(workers, async move { Ok(file) }, None, Some(config))
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
            None,
        ),
    }
}

/// Runs one CLI operation on a small runtime; prints its error and fails on error.
fn operate(op: impl std::future::Future<Output = Result<(), cli::CliError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(op) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the completion script for `shell`. Rendered into memory first: clap_complete panics
/// when its writer fails, and stdout may be a closed pipe (`keel completion bash | head`).
fn completion(shell: clap_complete::Shell) -> ExitCode {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "keel", &mut script);
    match std::io::Write::write_all(&mut std::io::stdout(), &script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the completion script: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for path in files {
        match config::load_checked(path) {
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
    source: Option<PathBuf>,
) -> ExitCode {
    // One worker means one thread: a current-thread runtime runs every task on the thread that
    // calls `block_on`. A one-worker multi-thread runtime would instead park the main thread in
    // `block_on` and run the tasks on a second thread, and the two wake each other (futex,
    // eventfd) all the time; measured here that costs CPU per request for nothing.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 0 {
            b.worker_threads(workers);
        }
        b
    };
    builder.enable_all().thread_name("keel-worker");
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
            Ok(d) => match source {
                Some(path) => d.with_source(path),
                None => d,
            },
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
