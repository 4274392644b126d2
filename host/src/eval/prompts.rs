//! Prompt sets: JSON Lines with one `{"instruction": ...}` object a line (AlpacaEval's
//! format). Lines with `"prompt"` or a first `"turns"` entry (MT-Bench, Arena-Hard) are read
//! too, so those sets work unchanged; other fields are ignored. The shipped set,
//! `examples/eval/prompts.jsonl`, is a few dozen instructions written for this project:
//! lists, explanations, how-tos, short creative writing and comparisons.

use std::path::Path;

use serde_json::Value;

/// The shipped prompt set.
pub const SHIPPED: &str = include_str!("../../../examples/eval/prompts.jsonl");

/// Why a prompt set cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}:{line}: not a JSON object: {reason}")]
    Json {
        origin: String,
        line: usize,
        reason: String,
    },
    #[error("{origin}:{line}: no \"instruction\", \"prompt\" or \"turns\" text")]
    NoInstruction { origin: String, line: usize },
    #[error("{origin}: no prompts")]
    Empty { origin: String },
}

/// The instructions of a JSONL text; `origin` names it in errors. Blank lines are skipped.
pub fn parse(text: &str, origin: &str) -> Result<Vec<String>, PromptError> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| PromptError::Json {
            origin: origin.to_string(),
            line: line_no,
            reason: e.to_string(),
        })?;
        let turn = value.get("turns").and_then(|t| t.get(0));
        let text = value
            .get("instruction")
            .or_else(|| value.get("prompt"))
            .and_then(Value::as_str)
            .or_else(|| turn.and_then(Value::as_str))
            .or_else(|| turn.and_then(|t| t.get("content")).and_then(Value::as_str))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| PromptError::NoInstruction {
                origin: origin.to_string(),
                line: line_no,
            })?;
        out.push(text.to_string());
    }
    if out.is_empty() {
        return Err(PromptError::Empty {
            origin: origin.to_string(),
        });
    }
    Ok(out)
}

/// The shipped set.
pub fn shipped() -> Vec<String> {
    // The shipped file is checked by a unit test, so this never falls back in practice.
    parse(SHIPPED, "examples/eval/prompts.jsonl").unwrap_or_default()
}

/// A user's JSONL file.
pub fn load(path: &Path) -> Result<Vec<String>, PromptError> {
    let text = std::fs::read_to_string(path).map_err(|source| PromptError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_set_parses() {
        let prompts = parse(SHIPPED, "shipped").expect("shipped set");
        assert!(prompts.len() >= 30, "{}", prompts.len());
        assert_eq!(shipped(), prompts);
    }

    #[test]
    fn alpaca_mt_bench_and_arena_hard_lines_are_read() {
        let text = "{\"instruction\": \"a\", \"dataset\": \"x\"}\n\n{\"prompt\": \"b\"}\n\
            {\"turns\": [\"c\", \"d\"]}\n{\"turns\": [{\"content\": \"e\"}]}\n";
        assert_eq!(parse(text, "t").expect("parses"), ["a", "b", "c", "e"]);
    }

    #[test]
    fn bad_lines_name_their_line() {
        let err = parse("{\"instruction\": \"a\"}\nnot json\n", "f.jsonl").unwrap_err();
        assert!(err.to_string().starts_with("f.jsonl:2:"), "{err}");
        let err = parse("{\"question\": \"a\"}", "f.jsonl").unwrap_err();
        assert!(
            matches!(err, PromptError::NoInstruction { line: 1, .. }),
            "{err}"
        );
        assert!(matches!(
            parse("\n", "f").unwrap_err(),
            PromptError::Empty { .. }
        ));
    }
}
