//! `turn-bench`: benchmarks for turn-server.
//!
//! * `turn-bench balance`: busiest/mean per-socket load of a listener group through the
//!   real kernel path, kernel hash vs the steering program in hash and p2c modes.

mod balance;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "turn-bench", about = "Benchmarks for turn-server")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-socket balance of a SO_REUSEPORT group: kernel hash, program hash, program p2c.
    /// Needs root (BPF). Loopback only.
    Balance {
        /// Trials per case and mode.
        #[arg(long, default_value_t = 200)]
        trials: usize,
        /// Flow arrival relative to load updates; both when not given.
        #[arg(long, value_enum)]
        arrival: Option<balance::Arrival>,
        /// Only this case (1 to 4, in the order of the table); all when not given.
        #[arg(long)]
        case: Option<usize>,
        /// Print JSON lines instead of a markdown table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Balance { trials, arrival, case: only, json } => {
            let arrivals = match arrival {
                Some(a) => vec![a],
                None => vec![balance::Arrival::Sequential, balance::Arrival::Burst],
            };
            if !json {
                println!(
                    "| case | arrival | kernel hash mean / p99 | program hash mean / p99 | p2c mean / p99 | p2c target | hash expected |"
                );
                println!("| --- | --- | --- | --- | --- | --- | --- |");
            }
            for (number, case) in balance::cases().into_iter().enumerate() {
                if only.is_some_and(|n| n != number + 1) {
                    continue;
                }
                for &arrival in &arrivals {
                    let mut row = Vec::new();
                    for steer in [balance::Steer::Kernel, balance::Steer::Hash, balance::Steer::P2c]
                    {
                        let outcome = balance::run(&case, steer, arrival, trials)?;
                        if json {
                            println!("{}", serde_json::to_string(&outcome)?);
                        }
                        row.push(outcome);
                    }
                    if !json {
                        let cell = |o: &balance::Outcome| format!("{:.3} / {:.3}", o.mean, o.p99);
                        println!(
                            "| {} | {:?} | {} | {} | {} | <= {:.2} | about {:.2} |",
                            case.name,
                            arrival,
                            cell(&row[0]),
                            cell(&row[1]),
                            cell(&row[2]),
                            case.p2c_target,
                            case.hash_expected
                        );
                    }
                }
            }
            if !json {
                println!(
                    "\n{trials} trials per cell; busiest / mean of datagrams received per socket."
                );
            }
            Ok(())
        }
    }
}
