//! Rendering a model's chat template (Jinja, as in Hugging Face `tokenizer_config.json` or GGUF's
//! `tokenizer.chat_template`) with `minijinja`.

use minijinja::{context, Environment, Error, ErrorKind};

use crate::error::{EngineError, Result};

/// One chat message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    /// `"system"`, `"user"` or `"assistant"`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// The most template instructions one rendering may execute. A chat template comes from the model file, so
/// it is outside data: without a budget, `{% for i in range(100000) %}{% for j in range(100000) %}` would run
/// for hours. Real templates use a few dozen instructions per message.
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// Renders `template` for `messages`, ending with the prompt of an assistant turn. A template that runs
/// more than [`TEMPLATE_FUEL`] instructions is an error.
pub fn render(template: &str, messages: &[Message], bos_token: &str, eos_token: &str) -> Result<String> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template)
        .map_err(|e| EngineError::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| EngineError::Template(e.to_string()))?;
    tmpl.render(context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| EngineError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_template_renders() {
        let m = [Message {
            role: "user".into(),
            content: "Hi".into(),
        }];
        let s = render(SMOLLM2, &m, "", "").unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn template_errors_are_reported() {
        let m = [Message {
            role: "user".into(),
            content: "Hi".into(),
        }];
        assert!(matches!(render("{% if %}", &m, "", ""), Err(EngineError::Template(_))));
        let e = render("{{ raise_exception('no system role') }}", &m, "", "").unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
    }
}
