//! `staircase bench`.

mod staircase;

/// Subcommands of `staircase bench`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Single model vs layered vs staircase Mixture-of-Agents: TTFT, total time, cache use.
    Staircase(staircase::Args),
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Staircase(args) => staircase::run(args),
    }
}
