//! Answers from a language model with its adapters, for checking a LoRA by hand (the `chat`
//! command) and for the sample prompts of a run: the prompt rendered as a user turn with the
//! model's chat template (or the plain one) and the generation prompt, then the most likely
//! token appended (greedy, as transformers' `generate(do_sample=False)`), until an end token or
//! `max_new_tokens`.
//!
//! The prompt runs once; each new token then runs alone against the keys and values of the
//! ones before it ([`KvCache`]).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::chat_template::ChatTemplate;
use super::labels::PLAIN_TEMPLATE;
use super::network::LmNetwork;
use super::peft::PeftAdapter;
use super::preflight::model_folder;
use super::records::{Message, Role};
use super::tokenizer::LmTokenizer;
use crate::models::causal_lm::{CausalLm, KvCache, LmFolder};
use crate::nn::Scope;
use crate::Result;

/// What greedy decoding needs besides the prompt.
pub struct Generator<'a> {
    pub model: &'a CausalLm,
    pub tokenizer: &'a LmTokenizer,
    template: ChatTemplate,
    /// Tokens that end an answer: the config's `eos_token_id`(s) and the tokenizer's
    /// `eos_token`.
    stop: Vec<u32>,
    pub device: Device,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a CausalLm, tokenizer: &'a LmTokenizer, device: &Device) -> Result<Self> {
        let template = match &tokenizer.template {
            Some(t) => t.clone(),
            None => ChatTemplate::new(
                PLAIN_TEMPLATE,
                tokenizer.bos_token.clone(),
                tokenizer.eos_token.clone(),
            )
            .map_err(|e| candle_core::Error::Msg(format!("the plain template: {e}")))?,
        };
        let mut stop = model.config().eos_token_ids.clone();
        if let Some(id) = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_id(t))
        {
            stop.push(id);
        }
        Ok(Generator {
            model,
            tokenizer,
            template,
            stop,
            device: device.clone(),
        })
    }

    /// The text `prompt` (a user turn, after `system` when given) is rendered as.
    pub fn prompt_text(&self, prompt: &str, system: Option<&str>) -> Result<String> {
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(Message {
                role: Role::System,
                content: system.to_string(),
            });
        }
        messages.push(Message {
            role: Role::User,
            content: prompt.to_string(),
        });
        let text = self
            .template
            .render(&messages, true, &[])
            .map_err(|e| candle_core::Error::Msg(format!("the chat template: {e}")))?;
        Ok(text)
    }

    /// The greedy answer to `prompt`: at most `max_new_tokens` tokens, the end token not
    /// included.
    pub fn answer(
        &self,
        prompt: &str,
        system: Option<&str>,
        max_new_tokens: usize,
    ) -> Result<String> {
        let text = self.prompt_text(prompt, system)?;
        let ids = self.tokenizer.encode(&text)?;
        let new = self.continue_ids(&ids, max_new_tokens)?;
        self.tokenizer.decode(&new)
    }

    /// The greedy continuation of `ids` (without them).
    pub fn continue_ids(&self, ids: &[u32], max_new_tokens: usize) -> Result<Vec<u32>> {
        let mut cache = KvCache::default();
        let mut input = ids.to_vec();
        let mut new = Vec::new();
        for _ in 0..max_new_tokens {
            if input.is_empty() {
                break;
            }
            let tokens = Tensor::from_vec(input.clone(), (1, input.len()), &self.device)?;
            let logits = self.model.next_logits(&tokens, &mut cache)?.squeeze(0)?;
            let next = logits.argmax(D::Minus1)?.to_scalar::<u32>()?;
            if self.stop.contains(&next) {
                break;
            }
            new.push(next);
            input = vec![next];
        }
        Ok(new)
    }
}

/// A model folder loaded for answering, with the adapter it is asked with.
pub struct AdaptedModel {
    pub model: CausalLm,
    pub tokenizer: LmTokenizer,
    /// The adapter's network (`None`: the base model alone).
    pub network: Option<LmNetwork>,
}

impl AdaptedModel {
    /// Loads `base_model` (a folder or a cached hub id) in `dtype` on `device`, with the PEFT
    /// adapter folder `adapter` when given.
    pub fn open(
        base_model: &str,
        adapter: Option<&Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<AdaptedModel> {
        let folder = model_folder(base_model)?;
        let lm = LmFolder::open(&folder, dtype, device)?;
        let tokenizer = LmTokenizer::open(&folder)?;
        let network = match adapter {
            Some(path) => Some(LmNetwork::from_adapter(
                PeftAdapter::open(path, device)?,
                path.display().to_string(),
                device,
            )),
            None => None,
        };
        let mut scope = Scope::root(&lm.weights);
        if let Some(network) = &network {
            scope = scope.with_adapters(network);
        }
        let model = CausalLm::new(scope, &lm.config)?;
        if let Some(network) = &network {
            network.check_built()?;
        }
        Ok(AdaptedModel {
            model,
            tokenizer,
            network,
        })
    }
}
