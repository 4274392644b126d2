//! A role alone: its system prompt, its parameters, and the messages it builds from the
//! prompt as the user's message and the `--upstream` answers.

use super::{Args, Target, print_output, timed, upstream_pairs};
use crate::engine::{ChatMessage, Role};
use crate::policy::{RoleInput, Source, UpstreamOutput};

pub(super) fn call(target: &Target<'_>, args: &Args) -> anyhow::Result<()> {
    let upstream = upstream_pairs(args)?
        .into_iter()
        .enumerate()
        .map(|(i, (label, text))| UpstreamOutput {
            source: Source {
                id: format!("upstream-{i}"),
                label,
            },
            text,
        })
        .collect();
    let mut role = target.provider.role(target.plugin, target.config)?;
    let system = timed("system-prompt", || role.system_prompt())?;
    print_output(format_args!("{system:?}"));
    let params = timed("params", || role.params())?;
    print_output(format_args!("{params:?}"));
    let input = RoleInput {
        conversation: vec![ChatMessage::new(Role::User, args.prompt.clone())],
        upstream,
    };
    let messages = timed("build-messages", || role.build_messages(&input))?;
    for message in &messages {
        print_output(format_args!(
            "{:<9} {:?}",
            format!("{:?}", message.role),
            message.content
        ));
    }
    Ok(())
}
