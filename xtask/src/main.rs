//! `cargo xtask`: gets a machine ready for Staircase, then runs cargo.
//!
//! The slow part of a first build (llama.cpp's C++ and the wasm plugins, about ten minutes on
//! two cores) is where missing tools used to surface. This crate has no dependencies and
//! builds in seconds, so it checks everything first: what it can install (system packages as
//! root, the wasm target, componentize-py, the JavaScript example's packages) it installs;
//! what it cannot, it names in one message with the command to run, before anything is
//! built. Plain `cargo build`, `cargo run` and `cargo test` are unchanged for machines that
//! have the prerequisites.

mod dist;
mod docs;
mod machine;
mod prereq;

use std::process::{Command, ExitCode};
use std::time::Instant;

use machine::Machine;
use prereq::{Missing, Scope, Step};

const USAGE: &str = "\
usage: cargo xtask <command> [args]

  run [ARGS]    install what building needs, then `cargo run -- run ARGS` (a staircase answer)
  test [ARGS]   install what the tests need, pull the model, then `cargo test --workspace ARGS`
  dist [--check] [--target-dir DIR]
                a portable release bundle in dist/ (any x86-64; llama.cpp picks its CPU
                kernels at start); --check runs the bundled binary from elsewhere
  docs          check README.md, docs/*.md and sdk/README.md: relative links and anchors exist,
                and `staircase ...` commands in code blocks use only flags their --help lists
                (runs $STAIRCASE_BIN, else target/debug/staircase: build it first)
  setup         install what the tests need; build nothing
  check         say what is missing and the command that gets it; change nothing";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let result = match command.as_str() {
        "run" => prepare(Scope::Build, "run", true).and_then(|machine| {
            let mut cargo_args = vec!["run", "--", "run"];
            cargo_args.extend(rest.iter().map(String::as_str));
            cargo(&machine, &cargo_args)
        }),
        "test" => prepare(Scope::Test, "test", true).and_then(|machine| {
            // Pulled once, with a progress bar, before the tests that load it start.
            cargo(&machine, &["run", "--quiet", "--", "model", "pull"])?;
            let mut cargo_args = vec!["test", "--workspace"];
            cargo_args.extend(rest.iter().map(String::as_str));
            cargo(&machine, &cargo_args)
        }),
        "dist" => {
            prepare(Scope::Build, "dist", true).and_then(|machine| dist::run(&machine, &rest))
        }
        "docs" => docs::run(&Machine::current().root),
        "setup" => prepare(Scope::Test, "setup", true).map(|_| ()),
        "check" => prepare(Scope::Test, "check", false).map(|_| ()),
        "" | "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Checks what `scope` needs and, when `install`, installs what it can. Fails with one
/// message naming every missing piece and its command, before any build starts.
fn prepare(scope: Scope, command: &str, install: bool) -> Result<Machine, String> {
    let started = Instant::now();
    let mut machine = Machine::current();
    let check = prereq::check(&machine, scope);
    machine.path.extend(check.path_additions);
    if check.missing.is_empty() {
        eprintln!(
            "xtask: prerequisites present ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        return Ok(machine);
    }
    if !install || check.missing.iter().any(|m| m.steps.is_err()) {
        return Err(explain(&check.missing, command, "missing"));
    }
    for missing in &check.missing {
        eprintln!("xtask: installing {}: {}", missing.what, missing.fix);
        for step in missing.steps.iter().flatten() {
            run_step(&machine, step).map_err(|e| {
                format!(
                    "{e}\nNothing was built. Fix that, or run `{}` yourself, then `cargo xtask \
                     {command}` again.",
                    missing.fix
                )
            })?;
        }
    }
    // The installers may have put a tool outside the search path; look once more.
    let check = prereq::check(&machine, scope);
    for dir in &check.path_additions {
        eprintln!(
            "xtask: note: {} is not on your PATH; add it to run `cargo test` without the xtask",
            dir.display()
        );
    }
    machine.path.extend(check.path_additions);
    if !check.missing.is_empty() {
        return Err(explain(
            &check.missing,
            command,
            "still missing after installing",
        ));
    }
    eprintln!(
        "xtask: prerequisites installed ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(machine)
}

/// The one message for what is missing (`state` says whether an install was tried): each
/// piece, why the xtask did not install it, and the commands that do.
fn explain(missing: &[Missing], command: &str, state: &str) -> String {
    let mut message =
        format!("`cargo xtask {command}` stopped before building anything; {state}:\n");
    for m in missing {
        message.push_str(&format!("  - {}", m.what));
        if let Err(why) = &m.steps {
            message.push_str(&format!("; {why}"));
        }
        message.push('\n');
    }
    let fixes: Vec<&str> = missing.iter().map(|m| m.fix.as_str()).collect();
    message.push_str(&format!(
        "Run:\n    {}\nthen `cargo xtask {command}` again.",
        fixes.join("\n    ")
    ));
    message
}

fn run_step(machine: &Machine, step: &Step) -> Result<(), String> {
    let shown = format!("{} {}", step.program, step.args.join(" "));
    let program = machine
        .which(&step.program)
        .ok_or_else(|| format!("`{shown}`: {} is not on PATH", step.program))?;
    let status = Command::new(&program)
        .args(&step.args)
        .envs(step.env.iter().copied())
        .env("PATH", machine.path_var())
        .current_dir(&machine.root)
        .status()
        .map_err(|e| format!("`{shown}` did not start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed ({status}); its output is above."))
    }
}

/// Runs cargo (the one running this xtask) in the repository root with the checked search
/// path; fails with cargo's status.
fn cargo(machine: &Machine, args: &[&str]) -> Result<(), String> {
    cargo_with_env(machine, args, &[])
}

/// [`cargo`] with extra environment variables.
fn cargo_with_env(machine: &Machine, args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cargo = Command::new(&program);
    cargo
        .args(args)
        .current_dir(&machine.root)
        .env("PATH", machine.path_var());
    // What cargo set for this package's run must not describe the builds below.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&key.as_ref())
        {
            cargo.env_remove(key.as_ref());
        }
    }
    if env.iter().any(|(key, _)| *key == "RUSTFLAGS") {
        // Cargo prefers this one; an explicit RUSTFLAGS must win.
        cargo.env_remove("CARGO_ENCODED_RUSTFLAGS");
    }
    let status = cargo
        .envs(env.iter().copied())
        .status()
        .map_err(|e| format!("cannot run cargo ({}): {e}", program.to_string_lossy()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}
