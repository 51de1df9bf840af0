//! A training record as token ids and the labels the loss reads: the conversation rendered by
//! the model's chat template and tokenized as a whole, with every token that carries an
//! assistant's text or the end-of-turn token right after it learned, and the rest (system and
//! user turns, the template's own text around the answers) labelled −100, unless
//! `train_on_prompt`. Plain-text records learn every token.
//!
//! Where an answer lies in the rendered text is found by rendering the conversation up to it
//! with `add_generation_prompt` (the text the answer follows) and finding the answer after
//! that (as written, else trimmed); a template that rewrites an answer otherwise cannot be
//! labelled and is refused. A token that straddles the edge of an answer counts as part of it.

use super::chat_template::ChatTemplate;
use super::records::{Message, Role, Sample};
use super::tokenizer::LmTokenizer;
use crate::Result;

/// The label of a token the loss ignores.
pub const IGNORED: i64 = -100;

/// A record's token ids and labels (`labels[t]` is `ids[t]` where the token is learned, else
/// [`IGNORED`]; the loss shifts them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Tokenized {
    /// The tokens the loss learns: labelled ones after the first (which nothing predicts).
    pub fn learned(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l >= 0).count()
    }
}

/// The format of a model without a chat template (a base model): Alpaca's, with the
/// end-of-text token after each answer.
pub const PLAIN_TEMPLATE: &str = "{% for m in messages %}{% if m.role == 'system' %}\
{{ m.content }}\n\n{% elif m.role == 'user' %}### Instruction:\n{{ m.content }}\n\n### Response:\n\
{% else %}{{ m.content }}{{ eos_token }}\n\n{% endif %}{% endfor %}";

/// Renders and tokenizes `sample` with `template` (the model's, or [`PLAIN_TEMPLATE`]) and
/// `tokenizer`; `extra` variables go to the template. The error says why the record cannot
/// be labelled.
pub fn tokenize(
    sample: &Sample,
    template: &ChatTemplate,
    tokenizer: &LmTokenizer,
    train_on_prompt: bool,
    extra: &[(&str, minijinja::Value)],
) -> Result<Tokenized> {
    let (text, spans) = match sample {
        Sample::Text(text) => {
            let mut text = text.clone();
            if let Some(eos) = &tokenizer.eos_token {
                text.push_str(eos);
            }
            let all = vec![(0, text.len())];
            (text, all)
        }
        Sample::Chat(messages) => answer_spans(messages, template, tokenizer, extra)?,
    };
    let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
    let labels = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(start, end))| {
            let learned = train_on_prompt
                || spans
                    .iter()
                    .any(|&(s, e)| start < e && end.max(start + 1) > s);
            if learned {
                i64::from(id)
            } else {
                IGNORED
            }
        })
        .collect();
    Ok(Tokenized { ids, labels })
}

/// The rendered conversation and the byte ranges of its answers (each with the end-of-turn
/// token that follows it).
fn answer_spans(
    messages: &[Message],
    template: &ChatTemplate,
    tokenizer: &LmTokenizer,
    extra: &[(&str, minijinja::Value)],
) -> Result<(String, Vec<(usize, usize)>)> {
    let fail = |message: String| -> crate::Error { candle_core::Error::Msg(message).into() };
    let text = template
        .render(messages, false, extra)
        .map_err(|e| fail(format!("the chat template refuses this conversation: {e}")))?;
    let mut spans = Vec::new();
    let mut searched_to = 0;
    for (k, message) in messages.iter().enumerate() {
        if message.role != Role::Assistant {
            continue;
        }
        let before = template
            .render(&messages[..k], true, extra)
            .map_err(|e| fail(format!("the chat template refuses this conversation: {e}")))?;
        let from = if text.starts_with(&before) {
            before.len().max(searched_to)
        } else {
            searched_to
        };
        // As written, or trimmed (Llama's template trims every message).
        let (start, answer) = [message.content.as_str(), message.content.trim()]
            .into_iter()
            .find_map(|answer| Some((from + text[from..].find(answer)?, answer)))
            .ok_or_else(|| {
                fail(format!(
                    "the chat template does not write answer {} as given (it changes more than \
                     the spaces around it), so its tokens cannot be told apart",
                    spans.len() + 1
                ))
            })?;
        let mut end = start + answer.len();
        if let Some(eos) = &tokenizer.eos_token {
            if text[end..].starts_with(eos.as_str()) {
                end += eos.len();
            }
        }
        spans.push((start, end));
        searched_to = end;
    }
    Ok((text, spans))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> LmTokenizer {
        LmTokenizer::open(&crate::fixtures::root().join("llm/qwen2")).unwrap()
    }

    fn template(name: &str, bos: Option<&str>, eos: Option<&str>) -> ChatTemplate {
        let path = crate::fixtures::root().join(format!("llm/templates/{name}.jinja"));
        ChatTemplate::new(
            &std::fs::read_to_string(path).unwrap(),
            bos.map(str::to_string),
            eos.map(str::to_string),
        )
        .unwrap()
    }

    fn chat(turns: &[(Role, &str)]) -> Sample {
        Sample::Chat(
            turns
                .iter()
                .map(|(role, content)| Message {
                    role: *role,
                    content: content.to_string(),
                })
                .collect(),
        )
    }

    /// The text of the learned tokens, in order.
    fn learned(t: &Tokenized, tokenizer: &LmTokenizer) -> String {
        let ids: Vec<u32> = t
            .ids
            .iter()
            .zip(&t.labels)
            .filter(|(_, &l)| l != IGNORED)
            .map(|(&id, _)| id)
            .collect();
        tokenizer.decode(&ids).unwrap()
    }

    #[test]
    fn only_the_answers_and_their_end_of_turn_tokens_are_learned() {
        let mut tok = tokenizer();
        let conversation = chat(&[
            (Role::System, "You answer in French."),
            (Role::User, "Hello"),
            (Role::Assistant, "Bonjour"),
            (Role::User, "Thank you"),
            (Role::Assistant, "De rien."),
        ]);
        let qwen = tok.template.take().unwrap();
        let t = tokenize(&conversation, &qwen, &tok, false, &[]).unwrap();
        assert_eq!(t.ids.len(), t.labels.len());
        assert_eq!(learned(&t, &tok), "Bonjour<|im_end|>De rien.<|im_end|>");
        // train_on_prompt learns every token.
        let all = tokenize(&conversation, &qwen, &tok, true, &[]).unwrap();
        assert!(all
            .labels
            .iter()
            .zip(&all.ids)
            .all(|(&l, &id)| l == i64::from(id)));

        // Other templates: their own end-of-turn token; Qwen3's empty thinking block is
        // template text, not learned; Llama's template trims the answer, the others keep it.
        let answer = chat(&[(Role::User, "What is 2+2?"), (Role::Assistant, "  4 ")]);
        for (name, bos, eos, want) in [
            ("qwen3", None, "<|im_end|>", "  4 <|im_end|>"),
            (
                "llama-3.1",
                Some("<|begin_of_text|>"),
                "<|eot_id|>",
                "4<|eot_id|>",
            ),
            ("mistral-nemo", Some("<s>"), "</s>", "  4 </s>"),
        ] {
            tok.eos_token = Some(eos.to_string());
            let t = template(name, bos, Some(eos));
            let date = [("date_string", minijinja::Value::from("26 Jul 2024"))];
            let got = tokenize(&answer, &t, &tok, false, &date).unwrap();
            assert_eq!(learned(&got, &tok), want, "{name}");
        }
    }

    #[test]
    fn plain_text_learns_everything_and_rewritten_answers_are_refused() {
        let tok = tokenizer();
        let plain = ChatTemplate::new(PLAIN_TEMPLATE, None, tok.eos_token.clone()).unwrap();
        let t = tokenize(&Sample::Text("the rain".into()), &plain, &tok, false, &[]).unwrap();
        assert_eq!(learned(&t, &tok), "the rain<|im_end|>");
        let c = chat(&[(Role::User, "Why?"), (Role::Assistant, "Because.")]);
        let t = tokenize(&c, &plain, &tok, false, &[]).unwrap();
        assert_eq!(learned(&t, &tok), "Because.<|im_end|>");

        let shouting = ChatTemplate::new(
            "{% for m in messages %}{{ m.content | upper }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let e = tokenize(&c, &shouting, &tok, false, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not write answer 1 as given"), "{e}");
    }
}
