//! `turn-server`: the daemon and its command-line tools.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use turn_server::config::{Config, LogFormat, SteeringMode};

/// A TURN/STUN server whose UDP listeners are balanced across worker threads by an eBPF
/// SO_REUSEPORT program (power of two choices over live load, flows pinned).
///
/// With no options it serves UDP 3478 on all addresses with an embedded default
/// configuration. Options keep coturn's names where they mean the same thing.
#[derive(Parser, Debug)]
#[command(name = "turn-server", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Parse and validate a configuration file, print the effective configuration.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
}

/// Flags of the daemon; each overrides the configuration file's key of the same meaning.
#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration file (every key optional; see docs/configuration.md).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// UDP port for STUN/TURN [config: listening_port, default 3478].
    #[arg(short = 'p', long = "listening-port", value_name = "PORT")]
    listening_port: Option<u16>,
    /// Address to listen on; repeat for several [config: listening_ips, default 0.0.0.0 and ::].
    #[arg(short = 'L', long = "listening-ip", value_name = "IP")]
    listening_ip: Vec<IpAddr>,
    /// Worker threads, one socket each per address [config: workers, default: one per CPU].
    #[arg(long = "workers", value_name = "N")]
    workers: Option<usize>,
    /// Placement of new client flows on the workers [config: steering, default auto].
    #[arg(long = "steering", value_enum)]
    steering: Option<SteeringMode>,
    /// Realm for long-term credentials [config: realm, default: the host name].
    #[arg(short = 'r', long = "realm")]
    realm: Option<String>,
    /// Log format [config: log_format, default text].
    #[arg(long = "log-format", value_enum)]
    log_format: Option<LogFormat>,
}

impl ServeArgs {
    fn config(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(port) = self.listening_port {
            config.listening_port = port;
        }
        if !self.listening_ip.is_empty() {
            config.listening_ips = self.listening_ip.clone();
        }
        if let Some(workers) = self.workers {
            config.workers = workers;
        }
        if let Some(steering) = self.steering {
            config.steering = steering;
        }
        if let Some(realm) = &self.realm {
            config.realm = Some(realm.clone());
        }
        if let Some(format) = self.log_format {
            config.log_format = format;
        }
        config.validate().context("invalid command-line options")?;
        Ok(config)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TURN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        None => cli.serve.config().and_then(|config| {
            init_logging(config.log_format);
            turn_server::daemon::run(config)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turn-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> Result<()> {
    let config = Config::load(file)?;
    println!("{}: valid", file.display());
    print!(
        "{}",
        toml::to_string(&config).context("printing the configuration")?
    );
    Ok(())
}
