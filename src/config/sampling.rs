//! The vocabulary of the preview keys (`sample_sampler`, `sample_prompts`): the samplers'
//! names and kohya's prompt-line syntax. The config reads them; `generate` draws with them.
//!
//! A prompt line is `prompt --n negative --w 512 --h 512 --d seed --s steps --l cfg --ss sampler`
//! (options in any order, each introduced by ` --`).

use std::fmt;
use std::str::FromStr;

/// The samplers on offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Ddim,
    EulerAncestral,
    DpmPp2m,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 3] = [
        SamplerKind::Ddim,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPp2m,
    ];

    /// The name on our command line: `ddim`, `euler_a`, `dpmpp_2m`.
    pub fn as_str(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::EulerAncestral => "euler_a",
            SamplerKind::DpmPp2m => "dpmpp_2m",
        }
    }

    /// The name A1111 writes in its generation parameters (`Sampler: Euler a`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::DpmPp2m => "DPM++ 2M",
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SamplerKind {
    type Err = String;

    /// Our names, plus the aliases kohya's `sample_sampler` and diffusers use for the same
    /// samplers (`k_euler_a`, `dpmsolver++`, ...).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ddim" => Ok(SamplerKind::Ddim),
            "euler_a" | "k_euler_a" | "euler_ancestral" | "euler a" => {
                Ok(SamplerKind::EulerAncestral)
            }
            "dpmpp_2m" | "dpmsolver++" | "dpm++_2m" | "dpm++ 2m" | "k_dpmpp_2m" => {
                Ok(SamplerKind::DpmPp2m)
            }
            _ => Err(format!(
                "unknown sampler `{s}`; available: ddim, euler_a (Euler ancestral), dpmpp_2m (DPM++ 2M)"
            )),
        }
    }
}

/// One preview prompt with kohya's defaults for what its line does not say.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    /// `--d`; `None`: the base seed plus the prompt's index.
    pub seed: Option<u64>,
    pub steps: usize,
    pub cfg_scale: f64,
    /// `--ss`; `None`: `sample_sampler`.
    pub sampler: Option<SamplerKind>,
}

impl SamplePrompt {
    /// `prompt` at 512×512, 30 steps, CFG 7.5 (kohya's defaults).
    pub fn new(prompt: impl Into<String>) -> Self {
        SamplePrompt {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            seed: None,
            steps: 30,
            cfg_scale: 7.5,
            sampler: None,
        }
    }

    /// Parses one line in kohya's syntax (see the module docs); the error names the option.
    pub fn parse_line(line: &str) -> std::result::Result<Self, String> {
        let mut parts = line.trim().split(" --");
        let prompt = parts.next().unwrap_or("").trim();
        if prompt.is_empty() {
            return Err("the line has no prompt before its options".to_string());
        }
        let mut sample = SamplePrompt::new(prompt);
        for option in parts {
            let option = option.trim();
            if option.is_empty() {
                continue;
            }
            let (key, value) = option.split_once(' ').unwrap_or((option, ""));
            let value = value.trim();
            let number = |what: &str| -> std::result::Result<u64, String> {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("`--{key} {value}`: the {what} must be a whole number"))
            };
            match key.to_ascii_lowercase().as_str() {
                "w" => sample.width = number("width")? as usize,
                "h" => sample.height = number("height")? as usize,
                "d" => sample.seed = Some(number("seed")?),
                "s" => sample.steps = number("number of steps")?.clamp(1, 1000) as usize,
                "l" => {
                    sample.cfg_scale = value
                        .parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| {
                            format!("`--l {value}`: the CFG scale must be a number such as 7.5")
                        })?
                }
                "n" => sample.negative_prompt = value.to_string(),
                "ss" => sample.sampler = Some(value.parse::<SamplerKind>()?),
                _ => {
                    return Err(format!(
                        "unknown option `--{key}`; a prompt line takes --n (negative prompt), \
                         --w, --h, --d (seed), --s (steps), --l (CFG scale) and --ss (sampler)"
                    ))
                }
            }
        }
        Ok(sample)
    }
}
