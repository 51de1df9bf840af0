//! The lines `train` prints before the first step: what is about to run, on what, for how long.
//!
//! Plain values in, text out: the trainer fills [`StartupFacts`] from whatever it loaded, so this
//! file depends on no model or device code.

use std::fmt;

use super::thousands;

/// What the user should see confirmed before training starts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StartupFacts {
    /// `cpu`, `cuda:0 (NVIDIA H200)`.
    pub device: String,
    /// The frozen weights' dtype and the precision mode: `f32`, `f16 (mixed precision fp16)`.
    pub dtype: String,
    /// Where the base model came from: `models/demo-sd (diffusers folder)`.
    pub model_source: String,
    /// The detected version: `SD 1.x`, `SD 2.x (v-prediction)`.
    pub model_version: Option<String>,
    pub images: usize,
    pub repeats: u32,
    pub lora_modules: usize,
    pub lora_parameters: u64,
    /// The adapters' ranks and alphas as built: `rank 8, alpha 4`, or with where they come
    /// from (`…, from network_weights`).
    pub adapters: String,
    pub total_steps: u64,
    pub epochs: u64,
    /// The step a resumed run continues from.
    pub resume_step: Option<u64>,
}

impl StartupFacts {
    /// One line per fact, labels aligned.
    pub fn lines(&self) -> Vec<String> {
        let model = match &self.model_version {
            Some(version) => format!("{}, {version}", self.model_source),
            None => self.model_source.clone(),
        };
        let samples = self.images as u64 * u64::from(self.repeats);
        let mut lines = vec![
            format!("device    {}, {}", self.device, self.dtype),
            format!("model     {model}"),
            format!(
                "images    {} × {} repeats = {} samples per epoch",
                thousands(self.images),
                self.repeats,
                thousands(samples)
            ),
            format!(
                "LoRA      {} modules, {} parameters ({})",
                thousands(self.lora_modules),
                thousands(self.lora_parameters),
                self.adapters
            ),
            format!(
                "steps     {} optimizer steps, {} epoch(s)",
                thousands(self.total_steps),
                self.epochs
            ),
        ];
        if let Some(step) = self.resume_step {
            lines.push(format!(
                "resume    from step {}: {} step(s) to go",
                thousands(step),
                thousands(self.total_steps.saturating_sub(step))
            ));
        }
        lines
    }
}

impl fmt::Display for StartupFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.lines() {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_lines_name_every_fact() {
        let facts = StartupFacts {
            device: "cpu".into(),
            dtype: "f32".into(),
            model_source: "models/demo-sd (diffusers folder)".into(),
            model_version: Some("SD 1.x".into()),
            images: 12,
            repeats: 10,
            lora_modules: 64,
            lora_parameters: 1_594_368,
            adapters: "rank 8, alpha 4".to_string(),
            total_steps: 1200,
            epochs: 10,
            resume_step: Some(400),
        };
        assert_eq!(
            facts.to_string(),
            "device    cpu, f32\n\
             model     models/demo-sd (diffusers folder), SD 1.x\n\
             images    12 × 10 repeats = 120 samples per epoch\n\
             LoRA      64 modules, 1,594,368 parameters (rank 8, alpha 4)\n\
             steps     1,200 optimizer steps, 10 epoch(s)\n\
             resume    from step 400: 800 step(s) to go\n"
        );
        let fresh = StartupFacts {
            resume_step: None,
            model_version: None,
            ..facts
        };
        assert_eq!(fresh.lines().len(), 5);
        assert_eq!(
            fresh.lines()[1],
            "model     models/demo-sd (diffusers folder)"
        );
    }
}
