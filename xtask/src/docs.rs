//! `cargo xtask docs`: checks the Markdown documentation against the repository and the
//! binary, so a moved page or a renamed flag cannot leave a dead link or a command that fails.
//!
//! Over `README.md`, `docs/*.md` and `sdk/README.md` it checks that (a) every relative link
//! and image target exists, and that a `#anchor` names a heading of the file it points into
//! (as GitHub makes anchors of headings); (b) every command in a fenced code block that starts
//! with `staircase SUBCOMMAND [SUBCOMMAND]` (or `cargo run -- ...`) uses only long flags that
//! the binary's `--help` for that command lists. It reads files and runs `staircase ... --help`;
//! it must not build anything (the binary is `$STAIRCASE_BIN`, else `target/debug/staircase`)
//! nor change a file. The parsing is plain string work, kept free of I/O so it is unit-tested.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One finding, printed as `FILE:LINE: what`.
#[derive(Debug, PartialEq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub what: String,
}

/// Checks the documentation of the repository at `root`; fails listing every problem.
pub fn run(root: &Path) -> Result<(), String> {
    let binary = match std::env::var_os("STAIRCASE_BIN") {
        Some(path) => PathBuf::from(path),
        None => root.join("target/debug/staircase"),
    };
    if !binary.is_file() {
        return Err(format!(
            "no staircase binary at {} to read its --help from: build it first (`cargo build`), \
             or point STAIRCASE_BIN at one",
            binary.display()
        ));
    }
    let mut help = HelpOf {
        binary,
        cache: HashMap::new(),
    };
    let files = doc_files(root)?;
    let mut problems = Vec::new();
    let mut commands = 0;
    for file in &files {
        let shown = file
            .strip_prefix(root)
            .unwrap_or(file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(file).map_err(|e| format!("{shown}: {e}"))?;
        let doc = parse(&text);
        for link in &doc.links {
            if let Some(what) = check_link(file, &link.target) {
                problems.push(Problem {
                    file: shown.clone(),
                    line: link.line,
                    what,
                });
            }
        }
        for command in &doc.commands {
            commands += 1;
            for what in check_command(&command.words, &mut help)? {
                problems.push(Problem {
                    file: shown.clone(),
                    line: command.line,
                    what,
                });
            }
        }
    }
    for p in &problems {
        eprintln!("{}:{}: {}", p.file, p.line, p.what);
    }
    if problems.is_empty() {
        eprintln!(
            "xtask: docs: {} files, their links and {commands} staircase commands check out",
            files.len()
        );
        Ok(())
    } else {
        Err(format!("{} problems in the docs (above)", problems.len()))
    }
}

/// `README.md`, `docs/*.md` (sorted) and `sdk/README.md`, those that exist.
fn doc_files(root: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = vec![root.join("README.md")];
    let docs = root.join("docs");
    if docs.is_dir() {
        let mut pages: Vec<PathBuf> = std::fs::read_dir(&docs)
            .map_err(|e| format!("{}: {e}", docs.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
            .collect();
        pages.sort();
        files.extend(pages);
    }
    files.push(root.join("sdk/README.md"));
    Ok(files.into_iter().filter(|f| f.is_file()).collect())
}

// ---- Markdown -------------------------------------------------------------------------------

/// A link or image target, with its line (1-based).
#[derive(Debug, PartialEq)]
pub struct Link {
    pub line: usize,
    pub target: String,
}

/// A command from a fenced code block: its words after `staircase`, and its first line.
#[derive(Debug, PartialEq)]
pub struct DocCommand {
    pub line: usize,
    pub words: Vec<String>,
}

/// What the checks need of one Markdown file.
#[derive(Debug, Default, PartialEq)]
pub struct Doc {
    pub links: Vec<Link>,
    pub commands: Vec<DocCommand>,
    /// GitHub's anchors of the headings, duplicates numbered as GitHub does.
    pub anchors: BTreeSet<String>,
}

/// Reads links and headings outside fenced code blocks, and `staircase` commands inside them
/// (joining lines continued with a trailing backslash).
pub fn parse(text: &str) -> Doc {
    let mut doc = Doc::default();
    let mut fence: Option<String> = None;
    let mut pending: Option<(usize, String)> = None;
    let mut slug_counts: HashMap<String, usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim_start();
        if let Some(marker) = &fence {
            if closes(trimmed.trim_end(), marker) {
                fence = None;
                pending = None;
                continue;
            }
            // A command line, possibly continued.
            let (start, mut joined) = pending.take().unwrap_or((line, String::new()));
            let body = raw.trim_end();
            if let Some(head) = body.strip_suffix('\\') {
                joined.push_str(head);
                joined.push(' ');
                pending = Some((start, joined));
                continue;
            }
            joined.push_str(body);
            if let Some(words) = staircase_words(&joined) {
                doc.commands.push(DocCommand { line: start, words });
            }
            continue;
        }
        if let Some(marker) = fence_marker(trimmed) {
            fence = Some(marker);
            continue;
        }
        if let Some(heading) = heading_text(trimmed) {
            let base = slug(heading);
            let count = slug_counts.entry(base.clone()).or_insert(0);
            let anchor = if *count == 0 {
                base.clone()
            } else {
                format!("{base}-{count}")
            };
            *count += 1;
            doc.anchors.insert(anchor);
        }
        for target in link_targets(raw) {
            doc.links.push(Link { line, target });
        }
    }
    doc
}

/// The opening fence of a code block (three or more backticks or tildes), if this is one.
fn fence_marker(trimmed: &str) -> Option<String> {
    let first = trimmed.chars().next()?;
    if first != '`' && first != '~' {
        return None;
    }
    let run: String = trimmed.chars().take_while(|&c| c == first).collect();
    (run.len() >= 3).then_some(run)
}

/// Whether a line closes the block `marker` opened: only the fence's character, at least as
/// many as opened it.
fn closes(line: &str, marker: &str) -> bool {
    let Some(c) = marker.chars().next() else {
        return false;
    };
    line.len() >= marker.len() && line.chars().all(|x| x == c)
}

/// An ATX heading's text (`## Title` gives `Title`).
fn heading_text(trimmed: &str) -> Option<&str> {
    let hashes = trimmed.chars().take_while(|&c| c == '#').count();
    if !(1..=6).contains(&hashes) {
        return None;
    }
    let rest = &trimmed[hashes..];
    if !rest.starts_with(' ') {
        return None;
    }
    Some(rest.trim().trim_end_matches('#').trim_end())
}

/// GitHub's anchor of a heading: lower case; letters, digits, `-` and `_` kept; spaces become
/// `-`; everything else (punctuation, backticks, brackets) dropped.
pub fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The targets of inline links and images (`[text](target "title")`) and of reference
/// definitions (`[name]: target`) on one line; text in code spans is not a link.
pub fn link_targets(line: &str) -> Vec<String> {
    let line = without_code_spans(line);
    let mut targets = Vec::new();
    let trimmed = line.trim_start();
    if trimmed.starts_with('[')
        && let Some(close) = trimmed.find(']')
        && trimmed[close + 1..].starts_with(':')
        && let Some(target) = trimmed[close + 2..].split_whitespace().next()
    {
        targets.push(target.trim_matches(['<', '>']).to_string());
        return targets;
    }
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let mut depth = 1;
        let mut end = None;
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else { break };
        let inside = after[..end].trim();
        let target = inside.split_whitespace().next().unwrap_or("");
        let target = target.trim_matches(['<', '>']);
        if !target.is_empty() {
            targets.push(target.to_string());
        }
        rest = &after[end + 1..];
    }
    targets
}

/// The line with every inline code span (`` `...` ``) removed.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

// ---- links ----------------------------------------------------------------------------------

/// What is wrong with a link from `file`, if anything. External links are not followed.
fn check_link(file: &Path, target: &str) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    let resolved = if path.is_empty() {
        file.to_path_buf()
    } else {
        dir.join(path)
    };
    if !resolved.exists() {
        return Some(format!("link target `{target}` does not exist"));
    }
    let anchor = anchor.filter(|a| !a.is_empty())?;
    if resolved.extension().is_none_or(|ext| ext != "md") {
        return None;
    }
    let text = std::fs::read_to_string(&resolved).ok()?;
    if parse(&text).anchors.contains(anchor) {
        None
    } else {
        Some(format!(
            "link `{target}`: no heading makes the anchor `#{anchor}`"
        ))
    }
}

// ---- commands -------------------------------------------------------------------------------

/// The words after `staircase` (or `cargo run [...] --`) of a shell line, up to a comment,
/// pipe, redirection or separator; `None` when the line runs something else. Leading
/// `VAR=value` assignments and a `$ ` prompt are skipped.
pub fn staircase_words(line: &str) -> Option<Vec<String>> {
    let line = line.trim().strip_prefix("$ ").unwrap_or(line.trim());
    let words = shell_words(line);
    let mut words = words
        .into_iter()
        .skip_while(|w| is_assignment(w))
        .peekable();
    match words.next()?.as_str() {
        "staircase" => {}
        "cargo" => {
            if words.next()? != "run" {
                return None;
            }
            // cargo's own flags come before `--`.
            words.by_ref().find(|w| w == "--")?;
        }
        _ => return None,
    }
    Some(words.collect())
}

fn is_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        }
        None => false,
    }
}

/// Splits a shell line into words (quotes respected and removed), stopping at an unquoted
/// comment, `|`, `>`, `<`, `;` or `&`.
pub fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            } else {
                word.push(c);
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                in_word = true;
            }
            '#' if !in_word => break,
            '|' | '>' | '<' | ';' | '&' => break,
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// A command's `--help`: its long flags and its subcommands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Help {
    pub flags: BTreeSet<String>,
    pub subcommands: BTreeSet<String>,
}

/// Reads clap's help text: the long flags of option lines (`-o, --output <OUTPUT>  ...`) and
/// the names under `Commands:`.
pub fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut in_commands = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            in_commands = false;
            continue;
        }
        if trimmed == "Commands:" {
            in_commands = true;
            continue;
        }
        if in_commands && line.starts_with(' ') {
            if let Some(name) = trimmed.split_whitespace().next() {
                help.subcommands.insert(name.to_string());
            }
            continue;
        }
        in_commands = false;
        if line.starts_with(' ') && trimmed.starts_with('-') {
            // The option's spec ends where its description begins (two spaces).
            let spec = trimmed.split("  ").next().unwrap_or(trimmed);
            for word in spec.split([' ', ',']) {
                if let Some(name) = word.strip_prefix("--") {
                    let name: String = name
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    if !name.is_empty() {
                        help.flags.insert(format!("--{name}"));
                    }
                }
            }
        }
    }
    help
}

/// Where the help of a command comes from: the binary in production, a table in tests.
pub trait HelpSource {
    fn help(&mut self, path: &[String]) -> Result<Help, String>;
}

struct HelpOf {
    binary: PathBuf,
    cache: HashMap<Vec<String>, Help>,
}

impl HelpSource for HelpOf {
    fn help(&mut self, path: &[String]) -> Result<Help, String> {
        if let Some(help) = self.cache.get(path) {
            return Ok(help.clone());
        }
        let output = Command::new(&self.binary)
            .args(path)
            .arg("--help")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        if !output.status.success() {
            return Err(format!(
                "`staircase {} --help` failed: {}",
                path.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let help = parse_help(&String::from_utf8_lossy(&output.stdout));
        self.cache.insert(path.to_vec(), help.clone());
        Ok(help)
    }
}

/// The problems of one command's words (after `staircase`): an unknown subcommand, or a long
/// flag its `--help` does not list. Flags before the subcommand are the top level's.
pub fn check_command(words: &[String], help: &mut dyn HelpSource) -> Result<Vec<String>, String> {
    let mut problems = Vec::new();
    let mut path: Vec<String> = Vec::new();
    let mut current = help.help(&path)?;
    let mut positional_seen = false;
    for word in words {
        if word == "--" {
            break;
        }
        if let Some(flag) = word.strip_prefix("--") {
            let name = format!("--{}", flag.split('=').next().unwrap_or(flag));
            if !current.flags.contains(&name) {
                let shown = if path.is_empty() {
                    "staircase".to_string()
                } else {
                    format!("staircase {}", path.join(" "))
                };
                problems.push(format!("`{shown}` has no flag `{name}` (its --help)"));
            }
            continue;
        }
        if word.starts_with('-') {
            continue;
        }
        if !positional_seen && !current.subcommands.is_empty() {
            if current.subcommands.contains(word) {
                path.push(word.clone());
                current = help.help(&path)?;
                continue;
            }
            let shown = format!("staircase {}", path.join(" "));
            problems.push(format!("`{}` has no subcommand `{word}`", shown.trim_end()));
            return Ok(problems);
        }
        positional_seen = true;
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn slugs_follow_github() {
        assert_eq!(slug("Quality: `staircase eval`"), "quality-staircase-eval");
        assert_eq!(
            slug("DRY (don't repeat yourself)"),
            "dry-dont-repeat-yourself"
        );
        assert_eq!(slug("`[sandbox]`"), "sandbox");
        assert_eq!(
            slug("Remote models and replicas"),
            "remote-models-and-replicas"
        );
    }

    #[test]
    fn links_images_and_references_are_found_but_not_in_code() {
        let line = "See [a](docs/a.md#x) and ![pic](docs/p.svg \"title\"), not `[b](nope.md)`; [w](https://e.org/(x)).";
        assert_eq!(
            link_targets(line),
            vec!["docs/a.md#x", "docs/p.svg", "https://e.org/(x)"]
        );
        assert_eq!(
            link_targets("[ref]: ../sdk/README.md"),
            vec!["../sdk/README.md"]
        );
        assert!(link_targets("no links [here] (at all)").is_empty());
        assert_eq!(link_targets("[a](x.md) then [b]: y"), vec!["x.md"]);
    }

    #[test]
    fn fences_hide_links_and_headings_and_hold_commands() {
        let text = "# Title\n## Title\n[x](a.md)\n```sh\n# not a heading\n[y](b.md)\nstaircase run \\\n  --json \"hi\"   # a comment\ncargo run --release -- serve --port 0\nls --all\n```\n## After `code`\n";
        let doc = parse(text);
        assert_eq!(
            doc.anchors,
            ["title", "title-1", "after-code"]
                .into_iter()
                .map(String::from)
                .collect()
        );
        assert_eq!(
            doc.links,
            vec![Link {
                line: 3,
                target: "a.md".into()
            }]
        );
        assert_eq!(
            doc.commands,
            vec![
                DocCommand {
                    line: 7,
                    words: words(&["run", "--json", "hi"])
                },
                DocCommand {
                    line: 9,
                    words: words(&["serve", "--port", "0"])
                },
            ]
        );
    }

    #[test]
    fn shell_lines_stop_at_comments_pipes_and_redirections() {
        assert_eq!(
            staircase_words("STAIRCASE_API_KEY=sk-1 staircase serve --port 0 &"),
            Some(words(&["serve", "--port", "0"]))
        );
        assert_eq!(
            staircase_words("staircase completions bash > FILE"),
            Some(words(&["completions", "bash"]))
        );
        assert_eq!(
            staircase_words("staircase eval --prompts 'a b.jsonl' # a#b"),
            Some(words(&["eval", "--prompts", "a b.jsonl"]))
        );
        assert_eq!(staircase_words("sudo staircase serve"), None);
        assert_eq!(staircase_words("cargo build --release"), None);
        assert_eq!(staircase_words("cargo xtask run hi"), None);
    }

    const TOP: &str = "Usage: staircase [OPTIONS] <COMMAND>\n\nCommands:\n  run          Run a pipeline\n  bench        Run a benchmark\n  help         Print this\n\nOptions:\n      --log-format <LOG_FORMAT>  Log lines as text or json (see --other-flag)\n  -h, --help                     Print help\n  -V, --version                  Print version\n";

    #[test]
    fn help_gives_flags_and_subcommands() {
        let help = parse_help(TOP);
        assert_eq!(
            help.subcommands,
            ["run", "bench", "help"]
                .into_iter()
                .map(String::from)
                .collect()
        );
        assert_eq!(
            help.flags,
            ["--log-format", "--help", "--version"]
                .into_iter()
                .map(String::from)
                .collect()
        );
    }

    struct Table(HashMap<Vec<String>, Help>);

    impl HelpSource for Table {
        fn help(&mut self, path: &[String]) -> Result<Help, String> {
            self.0
                .get(path)
                .cloned()
                .ok_or_else(|| format!("no help for {path:?}"))
        }
    }

    fn table() -> Table {
        let mut map = HashMap::new();
        map.insert(Vec::new(), parse_help(TOP));
        map.insert(
            words(&["run"]),
            parse_help("Options:\n      --json     JSON\n      --mode <MODE>  m\n"),
        );
        map.insert(
            words(&["bench"]),
            parse_help("Commands:\n  serve  s\n\nOptions:\n  -h, --help  h\n"),
        );
        map.insert(
            words(&["bench", "serve"]),
            parse_help("Options:\n      --clients <N>...  c\n"),
        );
        Table(map)
    }

    #[test]
    fn commands_are_checked_against_their_own_help() {
        let mut help = table();
        assert!(
            check_command(
                &words(&["run", "--json", "--mode=layered", "hi"]),
                &mut help
            )
            .unwrap()
            .is_empty()
        );
        assert_eq!(
            check_command(&words(&["run", "--jsn", "hi", "--clients", "1"]), &mut help).unwrap(),
            vec![
                "`staircase run` has no flag `--jsn` (its --help)",
                "`staircase run` has no flag `--clients` (its --help)"
            ]
        );
        assert!(
            check_command(
                &words(&["bench", "serve", "--clients", "1", "4"]),
                &mut help
            )
            .unwrap()
            .is_empty()
        );
        assert_eq!(
            check_command(&words(&["bench", "serv"]), &mut help).unwrap(),
            vec!["`staircase bench` has no subcommand `serv`"]
        );
        // A positional after the command is never taken for a subcommand.
        assert!(
            check_command(&words(&["run", "bench"]), &mut help)
                .unwrap()
                .is_empty()
        );
    }
}
