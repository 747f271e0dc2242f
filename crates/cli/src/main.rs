//! `shoal`: the Shoal server and the command-line client.
//!
//! `shoal server` and `shoal dev` run nodes (see `shoal_node::cli`); every other
//! command is a short-lived client session built on `shoal_client`. On failure a
//! command prints one line, `error: <reason>`, to stderr and exits with 2 for a usage
//! or validation error (the node's typed code is part of the reason) or 1 for anything
//! else (no node reachable, a timeout, a node failure).

mod cmd;
mod opts;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shoal_client::{ClientError, ErrorCode};

/// mimalloc, not the system allocator: measured faster for a node both with two
/// worker threads, where much of what one thread allocates another frees (glibc's
/// per-thread caches miss there), and with one (docs/benchmarks.md, twenty-fourth
/// series).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal: a service registry cluster.
#[derive(Parser, Debug)]
#[command(name = "shoal", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a Shoal node until SIGTERM or Ctrl-C.
    Server(Box<shoal_node::cli::ServerArgs>),
    /// Run a local development cluster until Ctrl-C.
    Dev(shoal_node::cli::DevArgs),
    /// Register an instance and hold it until Ctrl-C (which removes it).
    Register(cmd::register::Args),
    /// Remove an instance.
    Deregister(cmd::deregister::Args),
    /// List the instances of a service.
    List(cmd::list::Args),
    /// List the services of a namespace.
    Services(cmd::services::Args),
    /// Print the instances of a service, then every change until Ctrl-C.
    Watch(cmd::watch::Args),
    /// List the cluster's members as the node sees them.
    Members(cmd::members::Args),
    /// Show each member's share of the ring and, for a service, its owner.
    Ring(cmd::ring::Args),
}

/// A mistake in how a command was used, found before asking a node (exit code 2).
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_failure(e),
    };
    let result = match cli.command {
        Command::Server(args) => shoal_node::cli::run_server(*args),
        Command::Dev(args) => shoal_node::cli::run_dev(args),
        Command::Register(args) => client_command(|| cmd::register::run(args)),
        Command::Deregister(args) => client_command(|| cmd::deregister::run(args)),
        Command::List(args) => client_command(|| cmd::list::run(args)),
        Command::Services(args) => client_command(|| cmd::services::run(args)),
        Command::Watch(args) => client_command(|| cmd::watch::run(args)),
        Command::Members(args) => client_command(|| cmd::members::run(args)),
        Command::Ring(args) => client_command(|| cmd::ring::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the causes on one line.
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Runs a client command on a runtime of its own, with logging to stderr (RUST_LOG,
/// `warn` by default). `server` and `dev` set up their own logging and runtime.
fn client_command<F, Fut>(command: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(command())
}

/// 2 for usage and validation errors, 1 for the rest.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Server(body)) => match body.code {
            ErrorCode::NotReady | ErrorCode::Unavailable | ErrorCode::Internal => 1,
            _ => 2,
        },
        Some(ClientError::Config(_)) | Some(ClientError::Tls(_)) => 2,
        _ => 1,
    }
}

/// Clap's own errors (unknown flag, missing argument) as one line; help and version
/// print as usual.
fn clap_failure(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            let rendered = e.render().to_string();
            let first = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid usage");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("error: {} (see 'shoal --help')", first.trim());
            ExitCode::from(2)
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_client::ErrorBody;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn exit_codes() {
        let server = |code| anyhow::Error::from(ClientError::Server(ErrorBody::new(code, "x")));
        assert_eq!(exit_code(&server(ErrorCode::InvalidPort)), 2);
        assert_eq!(exit_code(&server(ErrorCode::NotFound)), 2);
        assert_eq!(exit_code(&server(ErrorCode::NotReady)), 1);
        assert_eq!(
            exit_code(&anyhow::Error::from(ClientError::Connect("x".into()))),
            1
        );
        assert_eq!(exit_code(&anyhow::Error::from(UsageError("x".into()))), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), 1);
    }

    #[test]
    fn server_errors_print_their_code() {
        let e = anyhow::Error::from(ClientError::Server(ErrorBody::new(
            ErrorCode::InvalidPort,
            "invalid port 0: must be 1..=65535",
        )));
        assert_eq!(
            one_line(&format!("{e:#}")),
            "InvalidPort: invalid port 0: must be 1..=65535"
        );
    }

    #[test]
    fn global_options_work_after_the_command() {
        let cli = Cli::try_parse_from([
            "shoal", "list", "orders", "--server", "a:1,b:2", "--server", "c:3", "--json",
        ])
        .unwrap();
        let Command::List(args) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(args.client.servers, vec!["a:1", "b:2", "c:3"]);
        assert!(args.client.json);
    }
}
