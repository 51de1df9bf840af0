//! What can go wrong while generating, said so that the user can fix it: every message names
//! the option, the prompt tag, the file or the prompt-file line at fault.

/// A generation problem: `origin` is where it comes from (`--width`, `<lora:x:0.8>`, a file,
/// `prompts.txt line 3`), `problem` what is wrong there.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct GenerateError {
    pub origin: String,
    pub message: String,
}

impl GenerateError {
    pub fn new(origin: impl Into<String>, message: impl Into<String>) -> Self {
        GenerateError {
            origin: origin.into(),
            message: message.into(),
        }
    }
}
