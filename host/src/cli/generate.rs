//! `staircase generate`.

/// Arguments of `staircase generate`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`staircase generate` is not available in this build yet")
}
