//! `staircase run`.

/// Arguments of `staircase run`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`staircase run` is not available in this build yet")
}
