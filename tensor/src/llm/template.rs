//! Chat templates: the Jinja template a GGUF file carries
//! (`tokenizer.chat_template`), rendered by minijinja with Python's string
//! methods (minijinja-contrib's pycompat), as Hugging Face's `transformers`
//! renders it. Templates come with uploaded files, so rendering runs on a
//! fuel budget: a template that loops without end fails, it does not hang.

use crate::error::{Error, invalid_input, invalid_model};
use serde::{Deserialize, Serialize};

/// Instructions a template may run per rendering (a real one runs a few
/// thousand per message).
const FUEL: u64 = 2_000_000;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or what the template knows).
    pub role: String,
    /// Its text.
    pub content: String,
}

/// A model's chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the texts of the model's
    /// special tokens, which templates write.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, Error> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(FUEL));
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| invalid_model(format!("gguf: tokenizer.chat_template does not compile: {e}")))?;
        Ok(ChatTemplate { env, bos: bos.to_string(), eos: eos.to_string() })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened
    /// when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, Error> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| invalid_input(format!("the chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn chatml_renders_as_transformers_does() {
        let source = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let out = t.render(&[message("user", " Hi there ")], true).unwrap();
        assert_eq!(out, "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn templates_that_fail_or_loop_are_errors() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err(), "does not compile");
        let raising = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let e = raising.render(&[], true).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
        let endless = ChatTemplate::new("{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}", "", "").unwrap();
        let e = endless.render(&[], true).unwrap_err().to_string();
        assert!(e.contains("fuel"), "a template that runs away runs out of fuel: {e}");
    }
}
