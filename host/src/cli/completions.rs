//! `staircase completions SHELL`: the completion script clap_complete writes from the
//! command line's own definition, so it never falls behind a flag. Prints only.

use std::io::Write;

use clap::CommandFactory;

/// Arguments of `staircase completions`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Install, e.g.: staircase completions bash > \
~/.local/share/bash-completion/completions/staircase; zsh: into a folder of $fpath as \
_staircase; fish: ~/.config/fish/completions/staircase.fish")]
pub struct Args {
    /// The shell to complete in.
    shell: clap_complete::Shell,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut command = super::Cli::command();
    let name = command.get_name().to_string();
    // Into memory first: clap_complete panics when its writer fails (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, name, &mut script);
    match std::io::stdout().write_all(&script) {
        // A reader that stopped early (`| head`) wanted no more.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => Ok(result?),
    }
}
