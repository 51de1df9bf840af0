//! WebUI's extra-network tags inside a prompt: `<lora:name:0.8>` applies the LoRA `name` at
//! weight 0.8 and is removed from the text the model reads, as A1111 does.
//!
//! A1111's rules: every `<word:args>` tag is cut out of the prompt (leaving the text around it
//! untouched); `args` split on `:` into positional items and `key=value` items; for `lora` (and
//! its alias `lyco`) the first positional item is the name, the second the text-encoder weight
//! (default 1), the third the UNet weight (default: the text-encoder weight), and `te=` /
//! `unet=` override them. Tags of other kinds (`hypernet`, ...) are cut out too and reported.

use super::error::GenerateError;
use crate::Result;

/// One `<lora:...>` tag.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The tag as written, `<lora:name:0.8>`.
    pub text: String,
    pub name: String,
    pub text_encoder_weight: f64,
    pub unet_weight: f64,
}

/// A prompt with its tags taken out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedPrompt {
    /// What the text encoder reads: the prompt without its tags.
    pub text: String,
    pub loras: Vec<LoraTag>,
    /// Tags of kinds we do not apply (`<hypernet:x:1>`), as written.
    pub ignored: Vec<String>,
}

/// Takes the extra-network tags out of `prompt`.
pub fn parse_prompt(prompt: &str) -> Result<ParsedPrompt> {
    let mut parsed = ParsedPrompt::default();
    let mut rest = prompt;
    while let Some(start) = rest.find('<') {
        parsed.text.push_str(&rest[..start]);
        let after = &rest[start..];
        match tag_at(after) {
            Some((kind, args, len)) => {
                let text = &after[..len];
                if kind == "lora" || kind == "lyco" {
                    parsed.loras.push(lora_tag(text, args)?);
                } else {
                    parsed.ignored.push(text.to_string());
                }
                rest = &after[len..];
            }
            None => {
                parsed.text.push('<');
                rest = &after[1..];
            }
        }
    }
    parsed.text.push_str(rest);
    Ok(parsed)
}

/// A tag `<kind:args>` at the start of `s` (A1111's `<(\w+):([^>]+)>`): kind, args and the
/// tag's length in bytes.
fn tag_at(s: &str) -> Option<(&str, &str, usize)> {
    let body = s.strip_prefix('<')?;
    let colon = body.find(':')?;
    let kind = &body[..colon];
    if kind.is_empty() || !kind.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let args_and_rest = &body[colon + 1..];
    let end = args_and_rest.find('>')?;
    if end == 0 {
        return None;
    }
    let args = &args_and_rest[..end];
    Some((kind, args, 1 + colon + 1 + end + 1))
}

fn lora_tag(text: &str, args: &str) -> Result<LoraTag> {
    let bad = |message: String| GenerateError::new(text, message);
    let mut positional = Vec::new();
    let mut named = Vec::new();
    for item in args.split(':') {
        match item.split_once('=') {
            Some((key, value)) => named.push((key, value)),
            None => positional.push(item),
        }
    }
    let name = positional.first().map(|n| n.trim()).unwrap_or("");
    if name.is_empty() {
        return Err(bad("the tag names no LoRA; write <lora:name:weight>".to_string()).into());
    }
    let number = |what: &str, value: &str| -> Result<f64> {
        // Rust reads `nan` and `inf` as numbers; a weight must be a finite one.
        match value.trim().parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => Err(bad(format!(
                "the {what} `{value}` is not a number; write <lora:{name}:0.8>"
            ))
            .into()),
        }
    };
    let mut te = match positional.get(1) {
        Some(v) => number("weight", v)?,
        None => 1.0,
    };
    let mut unet = match positional.get(2) {
        Some(v) => number("UNet weight", v)?,
        None => te,
    };
    for (key, value) in named {
        match key.trim() {
            "te" => te = number("te weight", value)?,
            "unet" => unet = number("unet weight", value)?,
            // A1111's dynamic-dimension option: only meaningful for its own LoRA code.
            "dyn" => {}
            other => {
                return Err(bad(format!(
                    "unknown option `{other}=`; a LoRA tag takes a name, weights, `te=` and `unet=`"
                ))
                .into())
            }
        }
    }
    Ok(LoraTag {
        text: text.to_string(),
        name: name.to_string(),
        text_encoder_weight: te,
        unet_weight: unet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_cut_out_and_read() -> Result<()> {
        let p = parse_prompt("a city, <lora:cyberpunk_v1:0.8> at night <lora:neon>")?;
        assert_eq!(p.text, "a city,  at night ");
        assert_eq!(p.loras.len(), 2);
        assert_eq!(p.loras[0].name, "cyberpunk_v1");
        assert_eq!(p.loras[0].text, "<lora:cyberpunk_v1:0.8>");
        assert_eq!(
            (p.loras[0].text_encoder_weight, p.loras[0].unet_weight),
            (0.8, 0.8)
        );
        assert_eq!(
            (p.loras[1].text_encoder_weight, p.loras[1].unet_weight),
            (1.0, 1.0)
        );
        Ok(())
    }

    #[test]
    fn separate_weights_and_named_options() -> Result<()> {
        let p = parse_prompt("<lora:a:0.5:1.2><lyco:b:te=0:unet=0.7><lora:c:1:unet=0.25>")?;
        let w: Vec<(f64, f64)> = p
            .loras
            .iter()
            .map(|t| (t.text_encoder_weight, t.unet_weight))
            .collect();
        assert_eq!(w, vec![(0.5, 1.2), (0.0, 0.7), (1.0, 0.25)]);
        assert_eq!(p.text, "");
        Ok(())
    }

    #[test]
    fn other_tags_and_plain_angle_brackets() -> Result<()> {
        let p = parse_prompt("x <hypernet:h:1> y < z > <:a> <lora:> w")?;
        assert_eq!(p.ignored, vec!["<hypernet:h:1>".to_string()]);
        assert_eq!(p.text, "x  y < z > <:a> <lora:> w");
        assert!(p.loras.is_empty());
        Ok(())
    }

    #[test]
    fn bad_weights_name_the_tag() {
        let err = parse_prompt("<lora:a:strong>").unwrap_err().to_string();
        assert!(
            err.starts_with("<lora:a:strong>: ") && err.contains("`strong`"),
            "{err}"
        );
        let err = parse_prompt("<lora:a:1:foo=2>").unwrap_err().to_string();
        assert!(err.contains("`foo=`"), "{err}");
    }
}
