//! Chat templates: the Jinja template stored in a GGUF, rendered with `minijinja` the way
//! Hugging Face tokenizers render it (Python string methods via `pycompat`,
//! `add_generation_prompt`, `raise_exception`), plus continuing a partial assistant answer.
//! Rendering only; tokenizing the result is the engine's job.

use minijinja::{Environment, ErrorKind, Value, context};
use serde::Serialize;

use crate::engine::{ChatMessage, EngineError, Role};

const TEMPLATE_NAME: &str = "chat";

/// Marks where a continued assistant message ends; a private-use character no real text has.
const CONTINUE_MARK: &str = "\u{F8FF}staircase-continue\u{F8FF}";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: &'a str,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

impl ChatTemplate {
    /// Compiles `source`. Errors name the template problem (unsupported syntax and the line).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| -> String {
            // Templates use this for a date line; a fixed string keeps prompts cacheable.
            let _ = format;
            String::new()
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|error| {
                EngineError::Template(format!("unsupported chat template: {error:#}"))
            })?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The prompt text for `messages`; with `assistant_prefix`, the text ends inside an
    /// assistant message that starts with the prefix, for the model to continue.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        assistant_prefix: Option<&str>,
    ) -> Result<String, EngineError> {
        let mut list: Vec<TemplateMessage<'_>> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: role_name(m.role),
                content: &m.content,
            })
            .collect();
        let marked;
        if let Some(prefix) = assistant_prefix {
            marked = format!("{prefix}{CONTINUE_MARK}");
            list.push(TemplateMessage {
                role: "assistant",
                content: &marked,
            });
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|error| EngineError::Template(error.to_string()))?;
        let rendered = template
            .render(context! {
                messages => Value::from(minijinja::value::Serde(&list)),
                add_generation_prompt => assistant_prefix.is_none(),
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|error| EngineError::Template(format!("rendering failed: {error:#}")))?;
        match assistant_prefix {
            None => Ok(rendered),
            Some(_) => match rendered.find(CONTINUE_MARK) {
                Some(end) => Ok(rendered[..end].to_owned()),
                None => Err(EngineError::Template(
                    "the template dropped the assistant message, so its prefix cannot be continued"
                        .into(),
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_generation_prompt_and_continuation() {
        let template = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let messages = [ChatMessage::new(Role::User, "Hi")];
        assert_eq!(
            template.render(&messages, None).unwrap(),
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            template.render(&messages, Some("Hello, ")).unwrap(),
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, "
        );
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}{{ messages[0]['content'].strip() }}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        assert_eq!(
            template
                .render(&[ChatMessage::new(Role::User, "  x ")], None)
                .unwrap(),
            "x"
        );
        let error = template
            .render(&[ChatMessage::new(Role::System, "s")], None)
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("first message must be from the user")
        );
    }

    #[test]
    fn bad_template_is_a_clear_error() {
        let error = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(error, EngineError::Template(_)));
        assert!(error.to_string().contains("unsupported chat template"));
    }
}
