//! `vmirq`: drive every interrupt path into a real (or simulated) guest and report.

mod alloc;
mod bench;
mod bench_snapshot;
mod bench_xen;
mod demo;
mod paths;
mod report;
mod soak;
mod xen_fifo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmirq_guest::machine::BackendKind;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(
    name = "vmirq",
    version,
    about = "vmirq: a VM's interrupt path from eventfd to guest vCPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the test guest and drive every interrupt path through it; print what arrived.
    Demo {
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Use the simulated backend even if /dev/kvm works.
        #[arg(long)]
        sim: bool,
        /// Paced triggers per path (each waits for its interrupt).
        #[arg(long, default_value_t = 300, value_parser = at_least_one)]
        count: usize,
        /// Live migrations in the `migrate` row (every path fired inside each).
        #[arg(long, default_value_t = 20, value_parser = at_least_one)]
        migrate: usize,
    },
    /// Drive every demo path at full rate with masking, re-routing and level-source churn;
    /// print the demo's table; fail on any loss.
    Soak {
        /// Print one JSON object (the demo's shape) instead of the table.
        #[arg(long)]
        json: bool,
        /// Use the simulated backend even if /dev/kvm works.
        #[arg(long)]
        sim: bool,
        /// Triggers per path.
        #[arg(long, default_value_t = 1_000_000, value_parser = at_least_one)]
        events: usize,
    },
    /// Measure each path against its baseline in one run; report ratios.
    Bench {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        sim: bool,
        /// Latency samples per path.
        #[arg(long, default_value_t = 2000, value_parser = at_least_one)]
        samples: usize,
    },
}

/// A count of one or more.
fn at_least_one(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// KVM when it works, else the simulated backend with a one-line notice.
fn pick_backend(force_sim: bool) -> BackendKind {
    if force_sim {
        return BackendKind::Sim;
    }
    if vmirq_guest::machine::KvmMachine::available() {
        BackendKind::Kvm
    } else {
        eprintln!("vmirq: /dev/kvm is not available; running on the simulated backend");
        BackendKind::Sim
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            json,
            sim,
            count,
            migrate,
        } => demo::run(pick_backend(sim), json, count, migrate),
        Command::Soak { json, sim, events } => soak::run(pick_backend(sim), json, events as u64),
        Command::Bench { json, sim, samples } => bench::run(pick_backend(sim), json, samples),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmirq: {e}");
            ExitCode::FAILURE
        }
    }
}
